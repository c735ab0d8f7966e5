"""``bundled_failures.py`` results side by side: colour match per prompted sprite count with a 95 % Wilson interval,
and each result against the first one clip by clip, on the clips both scored (the same held-out prompt and noise
seed; ``evaluate.paired``: clips gained, clips lost, the exact sign-test p-value).

    python benchmarks/compare_failures.py DIR/bundled_failures_cpu_teacher.json DIR/bundled_failures_cpu_student.json

Results written before ``bundled_failures.py`` kept per-clip outcomes give their totals only. Two models sampled
from the same seed draw independent videos; what the pairing removes is the prompt's difficulty.

``--card DIR`` also puts the table into a model folder's card: it stores the rows in ``DIR/train_log.json``
(``clip_comparison``, replacing an earlier one) and rewrites ``DIR/MODEL_CARD.md`` from that record (run from the
repository root, so the card names the results' folder as the repository does):

    python benchmarks/compare_failures.py R/bundled_failures_cpu_teacher_kept.json \
        R/bundled_failures_cpu_teacher_kept_eta1.json R/bundled_failures_cpu_student.json --card data/bundled
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from bundled_failures import sampler_text, short_path

from toolkit.models import bundled
from toolkit.models.bundled import evaluate
from toolkit.models.bundled.card import model_card
from toolkit.models.bundled.recipe import git_commit


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial fraction k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clip_outcomes(result: dict) -> dict[tuple[int, int], bool]:
    """(noise seed, prompt index) -> colour match, for every clip a result kept."""
    bits = result.get("colour_match_outcomes")
    if bits is None:
        return {}
    seeds = result.get("seeds", [result["seed"]])
    prompts = result["prompts"]
    if len(bits) != len(seeds) * prompts:
        raise ValueError(f"{len(bits)} outcomes for {len(seeds)} seeds x {prompts} prompts")
    return {(seed, i): bits[s * prompts + i] == "1" for s, seed in enumerate(seeds) for i in range(prompts)}


def compare(results: dict[str, dict]) -> dict:
    """Per sprite count and in all, each result's matches, clips and interval; and each result after the first
    paired with the first on their common clips."""
    table: dict[str, dict[str, dict]] = {}
    for name, r in results.items():
        rows = {n: (c["colour_match"], c["clips"]) for n, c in r["by_sprite_count"].items()}
        rows["all"] = (sum(k for k, _ in rows.values()), sum(n for _, n in rows.values()))
        for n, (k, clips) in rows.items():
            table.setdefault(n, {})[name] = dict(match=k, clips=clips, interval=wilson(k, clips))
    names = list(results)
    first = clip_outcomes(results[names[0]])
    pairs = {}
    for name in names[1:]:
        other = clip_outcomes(results[name])
        common = sorted(first.keys() & other.keys())
        if not common:
            continue
        pairs[name] = dict(clips=len(common), **evaluate.paired("".join("01"[first[c]] for c in common),
                                                                  "".join("01"[other[c]] for c in common)))
    return dict(table=table, paired_with=names[0], paired=pairs)


def card_entry(results: dict[str, dict], out: dict, source: str, commit: str) -> dict:
    """``compare``'s totals as the card's rows (``card.clip_comparison_text``): per result its weights, sampler,
    colour match with interval, four-sprite matches, count too low / too high, and the pairing with the first."""
    rows = []
    for name, r in results.items():
        total, counts = out["table"]["all"][name], r["by_sprite_count"]
        four = counts.get("4")
        rows.append(dict(name=name, weights=short_path(r["weights"]), sampler=sampler_text(r.get("sampler", {})),
                         match=total["match"], clips=total["clips"], interval=list(total["interval"]),
                         four_sprites=None if four is None else [four["colour_match"], four["clips"]],
                         count_low=sum(c.get("count_low", 0) for c in counts.values()),
                         count_high=sum(c.get("count_high", 0) for c in counts.values()),
                         paired=out["paired"].get(name)))
    return dict(source=source, commit=commit, devices=sorted({r.get("device", "?") for r in results.values()}),
                paired_with=out["paired_with"], rows=rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="bundled_failures_cpu_*.json files; the first is the base")
    p.add_argument("--card", type=Path, default=None, metavar="DIR",
                   help="also store the table in DIR/train_log.json and rewrite DIR/MODEL_CARD.md (a model folder)")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        p.error(f"no such result: {', '.join(missing)}")
    if args.card is not None and not all((args.card / f).is_file() for f in ("train_log.json", "model.safetensors")):
        p.error(f"--card {args.card}: not a model folder (it needs train_log.json and model.safetensors)")
    results = {path.stem.removeprefix("bundled_failures_cpu_"): json.loads(path.read_text()) for path in args.results}
    out = compare(results)
    width = max(22, *(len(n) + 2 for n in results))
    print("colour match by prompted sprite count (95 % Wilson interval)")
    print(f"{'sprites':>7} " + "".join(f"{n:>{width}}" for n in results))
    for count in sorted(out["table"], key=lambda c: (c == "all", c)):
        cells = []
        for name in results:
            c = out["table"][count].get(name)
            cells.append("-" if c is None else
                         f"{c['match']}/{c['clips']} ({c['interval'][0]:.0%}–{c['interval'][1]:.0%})")
        print(f"{count:>7} " + "".join(f"{cell:>{width}}" for cell in cells))
    for name, s in out["paired"].items():
        print(f"{name} against {out['paired_with']} on {s['clips']} common clips: +{s['gained']} −{s['lost']} "
              f"(sign test p = {s['p_value']:.2g})")
    if args.card is not None:
        log_file = args.card / "train_log.json"
        record = json.loads(log_file.read_text())
        source = os.path.commonpath([str(path.parent) for path in args.results])
        record["clip_comparison"] = card_entry(results, out, source, git_commit())
        card = model_card(record, bundled.load_bundled("cpu", path=args.card)[0])  # both files change, or neither
        log_file.write_text(json.dumps(record, indent=1) + "\n")
        (args.card / "MODEL_CARD.md").write_text(card)
        print(f"wrote the table into {log_file} and {args.card / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
