"""Where a fact lives: token positions of the subject, and the MLP keys there.

A context template is a short prefix ending in ``{}``; the request's prompt (subject filled
in) replaces the ``{}``. Keys are averaged over templates, as in ROME and MEMIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kedit.core.arch import ArchSpec
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize
from kedit.core.lm import adds_bos, model_device, pad_batch, pad_id_of

from .hooks import capture, last_run, stop_after


@dataclass(frozen=True)
class Located:
    """Token ids of (template x request) texts, and the subject's last token in each."""

    ids: list[list[int]]
    subject_pos: list[int]
    owner: list[int]  # index of the request each row belongs to


def fill(template: str, request: EditRequest) -> tuple[str, str]:
    """The full text and the text up to the end of the subject."""
    head = request.prompt.split("{}", 1)[0] + request.subject
    # the head ends at the subject: a frame's text after "{}" ("Q: {} A:") is not part of it
    return template.replace("{}", request.text, 1), template.split("{}", 1)[0] + head


def locate(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]) -> Located:
    """Tokenize every request in every template and find the subject's last token."""
    texts, heads, owner = [], [], []
    for t in templates:
        for i, r in enumerate(requests):
            full, head = fill(t, r)
            texts.append(full)
            heads.append(head)
            owner.append(i)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    enc = tokenizer(texts + heads, add_special_tokens=False)["input_ids"]
    ids = [bos + e for e in enc[: len(texts)]]
    pos = [len(bos) + len(h) - 1 for h in enc[len(texts) :]]
    return Located(ids, [min(p, len(i) - 1) for p, i in zip(pos, ids)], owner)


def average_by_owner(x: torch.Tensor, owner: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` ((rows,) or (rows, d)) that belong to each of n owners."""
    idx = torch.as_tensor(owner, device=x.device)
    sums = torch.zeros((n, *x.shape[1:]), device=x.device, dtype=x.dtype).index_add(0, idx, x)
    counts = torch.bincount(idx, minlength=n).clamp(min=1).to(x.dtype)
    return sums / counts.view(-1, *([1] * (x.dim() - 1)))


@torch.no_grad()
def read_at_subject(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], paths: Sequence[str], what: str
) -> dict[str, torch.Tensor]:
    """The input or output of each module at the subject's last token, averaged over templates.

    One padded forward pass for all requests and templates; (n_requests, d) fp32 per path.
    """
    loc = locate(tokenizer, requests, templates)
    # a causal model's state at the subject's last token does not depend on the tokens after it: they are not run
    # (18% of the tokens over CounterFact rows with the context templates, docs/target_phase_parts_smollm2.json)
    ids = [x[: s + 1] for x, s in zip(loc.ids, loc.subject_pos)]
    input_ids, mask, positions, offsets = pad_batch(ids, pad_id_of(tokenizer), "right", model_device(model))
    # the blocks above the last module read are not run
    with capture(model, list(paths), what) as store, stop_after(model, last_run(model, list(paths))):
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    rows = torch.arange(len(loc.ids), device=input_ids.device)
    cols = torch.tensor(loc.subject_pos, device=input_ids.device)
    return {p: average_by_owner(store[p][rows, cols].float(), loc.owner, len(requests)) for p in paths}


@torch.no_grad()
def read_every_position(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], path: str, what: str = "input"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's input or output at every token of each request's prompt, in one padded forward.

    Returns states (n, T, d) fp32, the subject's last token per row (n,) and which columns are real tokens (n, T).
    """
    loc = locate(tokenizer, requests, ("{}",))
    states, real = read_tokens(model, tokenizer, loc.ids, path, what)
    return states, torch.tensor(loc.subject_pos, device=states.device), real


@torch.no_grad()
def read_tokens(
    model: nn.Module, tokenizer, ids: list[list[int]], path: str, what: str = "input"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input or output at every token of each row of ``ids``: (n, T, d) fp32, real tokens (n, T)."""
    input_ids, mask, positions, _ = pad_batch(ids, pad_id_of(tokenizer), "right", model_device(model))
    with capture(model, [path], what) as store, stop_after(model, path):
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    return store[path].float(), mask.bool()


def subject_keys(
    model: nn.Module, tokenizer, spec: ArchSpec, layers: Sequence[int], requests: Sequence[EditRequest], templates: Sequence[str]
) -> dict[int, torch.Tensor]:
    """Per layer, the input of the MLP output projection at the subject: (n_requests, d_in)."""
    paths = {layer: spec.module_path("mlp_out", layer) for layer in layers}
    got = read_at_subject(model, tokenizer, requests, templates, list(paths.values()), "input")
    return {layer: got[p] for layer, p in paths.items()}


def other_subjects(requests: Sequence[EditRequest], per_request: int) -> tuple[list[EditRequest], list[int]]:
    """Each request's prompt about up to ``per_request`` of the batch's other subjects, the next ones in the batch's
    order: inputs whose outputs the update must keep. A subject that is the request's own (case and spacing folded),
    or that another request edits in this very prompt, is not one: those outputs are meant to change. Returns them
    and the index of the request each belongs to."""
    out: list[EditRequest] = []
    owner: list[int] = []
    if per_request <= 0:
        return out, owner
    edited = {r.slot for r in requests}
    subjects = list(dict.fromkeys(r.subject for r in requests))
    for i, r in enumerate(requests):
        start = subjects.index(r.subject)
        ring = subjects[start + 1 :] + subjects[:start]  # the batch's other subjects, from the request's own on
        kept = [s for s in ring if (normalize(s), normalize(r.prompt)) not in edited][:per_request]
        out += [EditRequest(id=f"{r.id}~{j}", subject=s, prompt=r.prompt, target_new=r.target_new) for j, s in enumerate(kept)]
        owner += [i] * len(kept)
    return out, owner


def context_templates(model: nn.Module, tokenizer, n: int = 5, length: int = 10) -> tuple[str, ...]:
    """``{}`` plus short greedy continuations of fixed seed words as prefixes (ROME's context templates)."""
    from kedit.core.lm import greedy_generate

    seeds = ["The", "Therefore", "Because", "I", "You", "It", "When", "In", "This", "A"][:n]
    if not seeds:  # no prefixes asked: the prompt alone
        return ("{}",)
    gens = greedy_generate(model, tokenizer, seeds, max_new_tokens=length)
    joined = [s + (g if g[:1].isspace() else " " + g) for s, g in zip(seeds, gens)]
    prefixes = [" ".join(j.replace("{", " ").replace("}", " ").split()) for j in joined]
    return ("{}",) + tuple(f"{p}. {{}}" for p in prefixes)


DEAD_GAIN = 0.01  # of the median gain: below it a post-MLP norm's coordinate is treated as silenced


@torch.no_grad()
def residual_to_mlp_output(
    model: nn.Module, tokenizer, spec: ArchSpec, layer: int, requests: Sequence[EditRequest], resid: torch.Tensor
) -> torch.Tensor:
    """A change of the residual stream at the subject, (n, d), as the change of block ``layer``'s MLP output
    projection that makes it.

    Where the MLP's output reaches the residual directly (Llama, GPT-2), they are the same. Where a norm sits between
    them (``spec.mlp_post_norm``, Gemma 2/3: y = g ⊙ m / rms(m)), a change of m is scaled by g / rms(m), 70 to 170
    on gemma-3-270m's middle layers: writing the residual's change into m unscaled overshoots by that much. Keeping
    m's scale, Δm = Δy ⊙ rms(m) / g (first order; the norm keeps y on its sphere, and MEMIT's later layers re-read
    what is left)."""
    if spec.mlp_post_norm is None:
        return resid
    gain, rms, dead = _post_norm(model, tokenizer, spec, layer, requests)
    # a coordinate the norm all but silences (gemma-3-270m has gains of exactly 0 there) cannot be moved through
    # this layer: it gets no change rather than an unbounded one
    return torch.where(dead, torch.zeros_like(resid), resid * rms / torch.where(dead, torch.ones_like(gain), gain))


@torch.no_grad()
def mlp_output_to_residual(
    model: nn.Module, tokenizer, spec: ArchSpec, layer: int, requests: Sequence[EditRequest], change: torch.Tensor
) -> torch.Tensor:
    """The inverse of ``residual_to_mlp_output``: a change (n, d) of block ``layer``'s MLP output as the change of the
    residual stream it makes, Δy = Δm ⊙ g / rms(m) to first order (the same change where no norm sits between)."""
    if spec.mlp_post_norm is None:
        return change
    gain, rms, dead = _post_norm(model, tokenizer, spec, layer, requests)
    return torch.where(dead, torch.zeros_like(change), change * gain / rms)


@torch.no_grad()
def post_norm_gain(model: nn.Module, spec: ArchSpec, layer: int) -> tuple[torch.Tensor, float]:
    """Block ``layer``'s post-MLP norm y = g ⊙ m / rms(m): its gain g (d,) fp32 and its epsilon."""
    norm = model.get_submodule(f"{spec.block(layer)}.{spec.mlp_post_norm}")
    weight = next(norm.parameters())
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
    ones = torch.ones(1, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return norm(ones).float()[0] * (1.0 + eps) ** 0.5, eps  # the norm of a vector of ones is its gain


def _post_norm(
    model: nn.Module, tokenizer, spec: ArchSpec, layer: int, requests: Sequence[EditRequest]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block ``layer``'s post-MLP norm y = g ⊙ m / rms(m) at each request's subject, at the current weights: its
    gain g (d,), rms(m) (n, 1), and the coordinates it all but silences (gain under DEAD_GAIN of the median), (d,)."""
    path = spec.module_path("mlp_out", layer)
    m = read_at_subject(model, tokenizer, requests, ("{}",), [path], "output")[path]  # (n, d)
    gain, eps = post_norm_gain(model, spec, layer)
    dead = gain.abs() < DEAD_GAIN * gain.abs().median()
    rms = (m.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # (n, 1), as the norm computes it
    return gain, rms, dead
