#!/bin/sh
# The committed study (docs/study.md): run from the repository root on a quiet machine.
# Two synthetic datasets with disjoint categories; AprilLab adapters trained on each
# (random ViT-S-16 weights); then every variant of synthetic.json evaluated on dataset A
# (10 test images per category: 6 good, 4 defective, so that MuSc's pool size 5 splits them).
set -e
W=study-work
clipinspect synth --out $W/A --categories weave,washer --size 128 --train 4 --test-good 6 --test-defect 1
clipinspect synth --out $W/B --categories tile,gear --size 128 --train 4 --test-good 2 --test-defect 1 --seed 1
clipinspect train-adapters $W/A --model ViT-S-16 --pretrained none --epochs 2 --batch-size 4 --out $W/adapters_A.pt --overwrite
clipinspect train-adapters $W/B --model ViT-S-16 --pretrained none --epochs 2 --batch-size 4 --out $W/adapters_B.pt --overwrite
clipinspect study $W/A --study benchmarks/studies/synthetic.json --work $W \
    --out benchmarks/results/study_synthetic "$@"
