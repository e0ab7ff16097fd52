"""The continual-editing stream as library functions; ``flows/stream.py`` calls one per Prefect task.

- ``config``: what a stream is asked to do (``StreamConfig``);
- ``plan``: validate and order the feeds (``make_plan``);
- ``session``: open the base model, the editor and the gates, restore production, start tracking;
- ``attempt``: per batch: edit, gate, commit a version or revert, record the attempt;
- ``report``: the drawdown plot and the closing summary with the feed ledger.

Every fact that enters ends in exactly one place: accepted (with the version that holds it),
quarantined (invalid record, editor cannot take it, or it failed a gate: with the reason), or
superseded (by a later update of the same subject and prompt). Facts already applied by an
earlier stream (or quarantined on top of the same chain) are skipped, which is what makes a
killed stream resumable without applying anything twice.
"""
