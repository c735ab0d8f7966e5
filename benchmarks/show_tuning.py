import json,sys
d=json.load(open(sys.argv[1]))
for r in d["rows"]:
    for t in (r.get("tuning") or []):
        if t.get("timings"):
            print(r["shape"], r["variant"], t["key"][:40], "->", t["config"])
            for cfg, ms in t["timings"]:
                print("   ", ms, cfg)
