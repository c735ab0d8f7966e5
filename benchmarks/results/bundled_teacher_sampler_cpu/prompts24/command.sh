#!/usr/bin/env bash
# CPU (2 cores, AMD EPYC, 2026-12-05): the kept teacher on the first 24 held-out prompts, same noise (batch 8,
# seed 0): CFG 2, CFG 4 for σ <= 0.8, CFG 4; run from the repository root, then the JSONs and logs copied here and
# the strips as half-size jpgs.
out=runs/cfg24; mkdir -p $out
w=data/teacher/teacher.safetensors
run() { name=$1; shift; python3 benchmarks/bundled_failures.py --prompts 24 --batch 8 --weights $w --strip 8 --out $out --name $name "$@" > $out/$name.log 2>&1; }
run teacher_cfg2 --teacher-cfg 2
run teacher_cfg4_sigma_0_0.8 --teacher-cfg 4 --cfg-interval 0 0.8
run teacher_cfg4 --teacher-cfg 4
# then, the same way:
run teacher_cfg4_sigma_0_0.9 --teacher-cfg 4 --cfg-interval 0 0.9
run teacher_cfg6_sigma_0_0.8 --teacher-cfg 6 --cfg-interval 0 0.8
# 2026-12-05 (fourteenth session), the same 24 clips sampled stochastically (solver "ancestral", DDIM's eta = 1);
# the strip re-titled afterwards (the caption then still said "Euler steps").
run teacher_cfg2_eta1 --teacher-cfg 2 --teacher-eta 1
run teacher_cfg3_eta1 --teacher-cfg 3 --teacher-eta 1
# 2026-12-05 (sixteenth session): autoguidance by the run-7 teacher (7,644 steps, data/teacher at commit 89335e9),
# v_g + 2·(v − v_g), beside CFG 2; and guidance against each sprite left out in turn instead of the null prompt.
# (Run with absolute paths from /tmp; the strips drawn with --strip 4.)
mkdir -p runs/guides && git show 89335e9:data/teacher/teacher.safetensors > runs/guides/teacher_7644.safetensors
run teacher_cfg2_ag7644_w2 --teacher-cfg 2 --guide runs/guides/teacher_7644.safetensors --guide-scale 2
run teacher_cfg2_loo --teacher-cfg 2 --leave-one-out
run teacher_cfg2_eta1_ag7644_w2 --teacher-cfg 2 --teacher-eta 1 --guide runs/guides/teacher_7644.safetensors --guide-scale 2
