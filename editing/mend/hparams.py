from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kedit.core.config import Seq, StrictConfig


class NetworkHyperParams(StrictConfig):
    """One gradient map per weight shape: [u; δ] -> [ũ; δ̃] by residual low-rank layers (identity at the start)."""

    rank: int = 256  # inner width of each residual layer
    n_hidden: int = 1  # residual layers besides the output one
    norm: bool = True  # standardize u and δ with running statistics gathered while training


class TrainHyperParams(StrictConfig):
    """The meta-training of the network (``kedit train mend``): Adam on the maps and the per-weight edit rates."""

    steps: int = 6000  # at most; early stopping on validation usually ends it before
    batch: int = 1  # facts edited together per step (their update is one)
    lr: float = 1e-4  # Adam, the maps' parameters
    lr_lr: float = 1e-4  # Adam, the per-weight edit learning rates
    c_edit: float = 0.1  # weight of the edit loss (the target's NLL after the update, prompt and rephrasing)
    c_loc: float = 1.0  # weight of KL(unedited || edited) on unrelated text
    # where that KL is taken: "answer", the positions that predict the unrelated prompt's answer (what
    # specificity scores); "all", every position of it (the reference; most of them a local edit cannot move)
    loc_positions: Literal["answer", "all"] = "answer"
    # the edit prompt's and rephrasing's position after the new target (what follows it) joins that KL: an
    # edit that makes its target follow itself generates "Paris Paris Paris" (fluency falls though no
    # scored prompt changes). Off in the presets: on SmolLM2 it raised single-edit fluency from 0.44 to 2.46
    # but cost 13 points of specificity (docs/benchmarks.md)
    after_target: bool = False
    # text about the fact's subject that asks nothing of the edited relation ("{} is a"): the KL also reads
    # every position from the subject's last token on. A single edit that promotes its target at every
    # position after the subject generates "India India India" from any prompt about the subject, while the
    # scored prompts and the unrelated text stay as trained. Off in the presets: on SmolLM2 it cut the positions
    # the target takes after its subject from 58% to 23% and lifted fluency from 0.84 to 2.50, at 23 points of
    # specificity (docs/benchmarks.md)
    subject_templates: Seq[str] = ()
    # per fact, other training facts of its prompt template (same relation, other subjects) added to that KL:
    # CounterFact's specificity asks exactly those prompts (an edit must move its subject, not its relation)
    negatives: int = 2
    # the share of rephrasings that get an unrelated sentence in front, taken from the training facts' own
    # prefixed rephrasings (ROME's CounterFact paraphrases all start with one; EasyEdit's training split, some)
    prefixed: float = 0.5
    val_every: int = 250  # steps between validations
    val_facts: int = 48  # held-out training facts scored at each validation
    # validations without improvement before stopping: the first ones favour a network that barely edits
    # (its KL is near 0); the total loss climbs while edits strengthen, then falls (SmolLM2: up from step 250 to
    # 1,000, below step 250's from 1,250)
    patience: int = 12
    checkpoint_every: int = 50  # steps between checkpoints (and at every validation)
    seed: int = 0
    grad_clip: float = 100.0  # on the network's gradient norm; MEND's reference clips as well

    @field_validator("subject_templates")
    @classmethod
    def _one_subject_then_text(cls, templates):
        for t in templates:
            if t.count("{}") != 1 or not t.split("{}", 1)[1].strip():
                raise ValueError(f"subject template {t!r} must hold '{{}}' once, with text after it")
        return templates


class MENDHyperParams(StrictConfig):
    """MEND (Mitchell et al., 2022): a trained network maps an edit's fine-tuning gradient to a weight update."""

    layers: Seq[int]  # blocks whose MLP projections are edited (the reference: the last three)
    kinds: Seq[Literal["mlp_in", "mlp_out"]] = ("mlp_in", "mlp_out")
    edit_lr: float = 1e-4  # initial per-weight edit learning rate (learned in training)
    # the blocks below the lowest edited one, at this precision in an edit (editing/stem.py); None: the model's;
    # "auto": bf16 where its matmuls are native (CUDA, or a CPU with AVX-512 BF16 or AMX), else the model's
    stem_dtype: Literal["auto", "bfloat16", "float16"] | None = None
    # the output head at this precision in an edit: the edit loss runs through it forward and backward, and no
    # edit changes it (a copy like the stem's, rebuilt when its weights change); None: the model's
    head_dtype: Literal["auto", "bfloat16", "float16"] | None = None
    # a factor on the trained network's update at edit time (training never reads it): the network learns its edit
    # rates against the training's balance of edit loss and KL, and a smaller update trades some of the edit's
    # strength for less of its spill into the subject's free text and its relation's other subjects (SmolLM2, one
    # network, 0.75: 0.985 / 0.955 / 0.635 -> 0.935 / 0.883 / 0.663, fluency 0.65 -> 1.41; below 0.75 edits stop
    # taking; kept at 1.0 until more than one network says so: docs/benchmarks.md)
    edit_scale: float = Field(1.0, gt=0.0)
    network: NetworkHyperParams = NetworkHyperParams()
    train: TrainHyperParams = TrainHyperParams()
