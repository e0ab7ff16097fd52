from __future__ import annotations

from typing import Literal

from editing.hparams import StatisticsHyperParams, TemplateHyperParams
from kedit.core.config import Seq, StrictConfig


class MemoryHyperParams(StrictConfig):
    """The side memory and its knowledge shards (WISE's ``mask_ratio``, ``save_freq``, ``merge_freq``, ``densities``)."""

    mask_ratio: float = 0.2  # share of the side memory's elements one shard may write (a random mask per shard)
    shard_edits: int = 500  # edits written into one shard before it closes and the next opens
    shards: int = 2  # closed shards that are TIES-merged into the side memory at once (merge_freq / save_freq)
    density: float = 0.53  # TIES: the share of each shard's largest-magnitude elements kept before the sign vote
    seed: int = 0  # the shard masks are drawn from this seed and the side memory's history, so a chain is reproducible


class RouterHyperParams(StrictConfig):
    """Δact(x) = ‖(W' - W) a(x)‖: how far a memory moves the layer's output at a token. A token whose largest Δact
    exceeds ε = act_ratio × (the smallest Δact an edit reached on one of its own tokens) reads that memory; in modes
    ``mean`` and ``max`` the Δact of a token is its sequence's mean or max so far."""

    act_ratio: float = 0.88
    # token: a token is routed on its own Δact (ε below every edited token's); mean: on each memory's mean Δact over
    # its sequence up to it, WISE's whole-input rule made causal; max: on its running max (ε below every edited
    # token's running statistic)
    mode: Literal["token", "mean", "max"] = "token"
    # WISE's margins: unrelated tokens below irrelevant_max (α), edited tokens above edit_min (β), and an edit's
    # mean above an unrelated text's by gap (γ); the gap also separates the open shard from every other memory
    irrelevant_max: float = 5.0
    edit_min: float = 20.0
    gap: float = 10.0


class TrainHyperParams(StrictConfig):
    """The shard's values: SGD on the masked elements only, each kept within ``norm_constraint`` of where it began."""

    steps: int = 70  # n_iter
    optimizer: Literal["sgd", "adam"] = "sgd"  # the reference's SGD; Adam moves each element by about lr a step
    lr: float = 1.0
    weight_decay: float = 1e-5
    norm_constraint: float = 1.0  # elementwise bound on a shard's change in one edit
    stop_loss: float = 0.05  # stop once the target's NLL and the margins' loss are both below this
    # the open shard's earlier edits, kept: the change's Δact on their tokens, (‖Δ a‖ / edit_min)², weighs this much
    # (WISE replays earlier edits; here their tokens' inputs are kept, as AlphaEdit keeps its keys)
    keep: float = 1.0
    project: bool = False  # keep them exactly instead: the change projected off their inputs (no longer masked)


class IrrelevantHyperParams(StrictConfig):
    """Unrelated inputs the router must leave on the main memory, never a benchmark's locality prompts: the model's
    own greedy continuations of these seeds (generated once per editor) and passages of the editor's text corpus
    (the one key statistics read; without one, text the model generates)."""

    seeds: Seq[str] = ("The", "In", "It", "When", "Q: What", "Q: Who", "Q: Where", "Q: Which")
    length: int = 16  # tokens generated per seed
    passages: int = 32  # corpus passages, spread evenly over the corpus
    max_tokens: int = 32  # every unrelated row is cut to this many tokens


class NullSpaceHyperParams(StrictConfig):
    """The shard's change reads only the directions of the layer's input where general text (the corpus) carries
    the least energy, together at most ``leak`` of it, so an unrelated token's Δact stays near 0 and the router
    leaves it on the main memory (AlphaEdit's null space, applied to the side memory's router)."""

    leak: float  # share of E‖a‖² over the corpus that lies in the directions the change may read
    statistics: StatisticsHyperParams = StatisticsHyperParams(samples=1000, length=128)


class WISEHyperParams(StrictConfig):
    layer: int  # block whose MLP output projection (the value matrix W_v) gets a side memory
    memory: MemoryHyperParams = MemoryHyperParams()
    router: RouterHyperParams = RouterHyperParams()
    train: TrainHyperParams = TrainHyperParams()
    # the fact's prompt after the model's own generated prefixes (WISE's context templates): rows the shard trains on
    templates: TemplateHyperParams = TemplateHyperParams(count=10, length=5)
    irrelevant: IrrelevantHyperParams = IrrelevantHyperParams()
    null_space: NullSpaceHyperParams | None = None
