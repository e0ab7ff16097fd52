"""Where a single MEND edit changes the edited subject's free text.

usage: python scripts/mend_generation.py [--network DIR] [--data FILE] [--start K] [--n 20] [--set KEY=YAML_VALUE ...]
                                        [--threads 2] [--json FILE]

For each of the first ``--n`` CounterFact records after ``--start`` (default ``counterfact_500.rome.json``, the
records the single-edit benchmark scores; its first generation prompt, or "<subject> is" for a record without
one, such as those of EasyEdit's training split): the unedited model's greedy continuation (30 tokens) of that
prompt is read teacher-forced by the unedited and by the edited model, and every position from the subject's last
token on is checked for the edit's target: "taken" when the edited model's argmax there is the target's first token and
the unedited model's is not. Then both models generate from the prompt, and the script reports ROME's n-gram
entropy of each text, and whether the edited text names the new target. Each edit is reverted before the next.
``--set``: MEND preset overrides (``edit_scale=0.5``). ``--network``: a network directory written by
``kedit train mend`` (``OUT/network``); default the production network registered for the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from editing import make_editor
from editing.mend.mend import MEND
from evaluation.metrics import ngram_entropy
from kedit.app.bench import _cases, editor_on, machine
from kedit.app.options import sets_to_overrides
from kedit.core.lm import encode_prompts
from kedit.store.naming import identify
from kedit.store.networks import tree_sha256

DATA = "../shared/data/counterfact/counterfact_500.rome.json"


def greedy(model, tok, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]


def one(model, tok, editor, request, n_new: int) -> dict:
    prompt = request.generation_prompts[0] if request.generation_prompts else f"{request.subject} is"
    at = prompt.find(request.subject)
    if at < 0:
        raise ValueError(f"case {request.id}: generation prompt {prompt!r} does not name the subject {request.subject!r}")
    # the prompt and its text up to the subject's end, tokenized as the editors locate a subject (editing.keys.locate)
    full, head = encode_prompts(tok, [prompt, prompt[: at + len(request.subject)]])
    ids = torch.tensor([full])  # (1, T)
    base_new = greedy(model, tok, ids, n_new)
    text = torch.cat([ids[0], base_new])[None]  # (1, T + n_new): the unedited model's own text
    first = len(head) - 1  # the subject's last token
    target = tok(" " + request.target_new, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        before = model(text).logits[0, first:].argmax(-1)  # (positions from the subject's last token,)
    editor.edit([request])
    try:
        with torch.no_grad():
            after = model(text).logits[0, first:].argmax(-1)
        edited_new = greedy(model, tok, ids, n_new)
    finally:
        editor.revert()
    taken = (after == target) & (before != target)
    base_text, edited_text = tok.decode(base_new), tok.decode(edited_new)
    return {
        "case_id": request.id,
        "prompt": prompt,
        "target_new": request.target_new,
        "positions": int(taken.numel()),
        "taken": float(taken.float().mean()),
        "entropy_unedited": ngram_entropy(base_text),
        "entropy_edited": ngram_entropy(edited_text),
        "names_target": float(request.target_new.lower() in edited_text.lower()),
        "unedited": base_text,
        "edited": edited_text,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--network", type=Path, help="a trained network directory (default: the registered production one)")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="MEND preset override KEY=YAML_VALUE")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = sets_to_overrides(tuple(args.sets)) or None  # the CLI's own --set: KEY=YAML_VALUE
    if args.network:
        from kedit.core.models import load_model

        model, tok = load_model(args.model)
        _, fingerprint = identify(args.model, model)
        provenance = {"network_dir": str(args.network), "network_sha256": tree_sha256(args.network)}
        net = MEND.open_asset("network", args.network, fingerprint, provenance)
        editor = make_editor("mend", model, tok, overrides, assets={"network": net})
    else:
        model, tok, editor, _ = editor_on(args.model, "mend", None, overrides)
    rows = [one(model, tok, editor, r, args.tokens) for r in _cases(args.data, args.n, args.start)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("taken", "entropy_unedited", "entropy_edited", "names_target")}
    setting = {"data": args.data, "start": args.start, "overrides": overrides or {}}
    out = {"machine": machine(), "network": editor.provenance(), **setting, "n": len(rows), **mean, "records": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "records"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
