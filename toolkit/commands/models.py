"""`toolkit models`: the models the toolkit knows, their sizes, and where their weights are looked for."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        epilog=(
            'examples:\n'
            '  toolkit models            each model, its size, and where its weights were looked for (found or not)\n'
            '  toolkit models --json\n'
        ),
        help="list models, their sizes and where weights are looked for (found or not)",
        description=(
            "List the models (bundled, self-forcing, wan2.1-t2v-1.3b) with parameter counts, bf16 sizes, and every "
            "place their weights are looked for, in order, marking what was found. Nothing is downloaded."
        ),
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(func=run)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.3g} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1000
    raise AssertionError


def describe() -> list[dict[str, Any]]:
    """One dict per model: name, description, causal, params, bf16 bytes, locations, download, assets."""
    from toolkit.errors import ToolkitError
    from toolkit.models import checkpoints as ck
    from toolkit.models import registry

    out = []
    for name, spec in registry.MODELS.items():
        entry: dict[str, Any] = {"name": name, "default": name == registry.DEFAULT_MODEL,
                                 "description": spec.description, "causal": spec.causal}
        try:
            cfg = spec.config()
            entry["params"] = ck.param_count(cfg)
            entry["bf16_bytes"] = 2 * entry["params"]
            entry["locations"] = [{"where": loc.label, "path": loc.pattern,
                                   "found": str(loc.found) if loc.found else None} for loc in spec.locations()]
        except ToolkitError as err:
            entry["error"] = str(err)
            entry["locations"] = []
        entry["download"] = spec.download()
        entry["checkpoint_accepts"] = spec.accepts
        if spec.uses_wan_assets:
            assets = {}
            for what, rel in registry.WAN_ASSETS.items():
                try:
                    assets[what] = str(registry.wan_file(rel))
                except ToolkitError:
                    assets[what] = None
            entry["wan_assets"] = assets
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> int:
    from toolkit.models import registry

    models = describe()
    if args.json:
        print(json.dumps({"hf_hub_cache": str(registry.hf_hub_cache()), "models": models}, indent=2))
        return 0
    print(f"Hugging Face cache (read offline): {registry.hf_hub_cache()}")
    for m in models:
        print()
        size = f"{m['params']:,} params, {_size(m['bf16_bytes'])} in bf16" if "params" in m else m.get("error", "")
        kind = "causal" if m["causal"] else "bidirectional"
        print(f"{m['name']}{' (default)' if m['default'] else ''}: {kind}, {size}")
        print(f"  {m['description']}")
        print("  weights, looked for in this order (the first found is used):")
        for loc in m["locations"]:
            mark = "found" if loc["found"] else "-----"
            print(f"    [{mark}] {loc['where']}: {loc['found'] or loc['path']}")
        print(f"  --checkpoint PATH overrides them: {m['checkpoint_accepts']}")
        if not any(loc["found"] for loc in m["locations"]):
            print("  download: " + " && ".join(m["download"]))
        assets = m.get("wan_assets", {})
        for what, path in assets.items():
            print(f"  {what}: {path or 'not found (' + registry.WAN_REPO + ' folder)'}")
        if assets and not all(assets.values()):
            print(f"  download (text encoder, tokenizer, VAE): huggingface-cli download {registry.WAN_REPO}")
    return 0
