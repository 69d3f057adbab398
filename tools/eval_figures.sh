#!/usr/bin/env bash
# The fine-tuning figures of docs/eval.md, on train.seed 0-2 (a few minutes on 2 CPU cores): fine-tuning on 10% of
# the labels after a short Barlow Twins pretraining of the small CNN, against the same architecture's default
# (PyTorch) init with the same recipe and the same class-balanced subset (digits at 16 px). The commands are those
# of tests/integration/test_eval_digits.py. (kNN and linear-probe figures against torchvision's init: `largessl demo
# train.seed=S`, README "The demo".) Usage: tools/eval_figures.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-eval-figures}
PY=${PYTHON:-python}
mkdir -p "$OUT"
$PY - "$OUT" <<'EOF'
import json, sys
from largessl.data.digits import write_digits_shards
out = sys.argv[1]
json.dump({"digits16": write_digits_shards(f"{out}/digits16", image_size=16)}, open(f"{out}/data.json", "w"))
EOF
read -r D_TRAIN D_VAL < <($PY -c "import json; print(*json.load(open('$OUT/data.json'))['digits16'])")
QUIET="log.progress=false log.tensorboard=false data.num_workers=0"
FT_COMMON="model.arch=repro_convnet model.small_input=false data.image_size=16 train.device=cpu data.shuffle_buffer=512 $QUIET"
FT_RECIPE="eval.finetune.percents=[10] eval.finetune.epochs=20 eval.finetune.batch_size=32 eval.finetune.head_lr=[1.0] eval.finetune.backbone_lr=[0.02]"
for seed in 0 1 2; do
  R="$OUT/seed$seed"
  # fine-tuning (10% of the labels)
  $PY -m largessl pretrain train.run_dir="$R/ft-run" data.train_manifest="$D_TRAIN" data.val_manifest="$D_VAL" $FT_COMMON \
    method.projector=256-256 data.augment=small optim.base_lr=0.5 optim.warmup_epochs=1 train.global_batch_size=128 \
    train.num_steps=60 checkpoint.every_steps=1000 checkpoint.at_epoch_end=false eval.online_probe=false train.seed=$seed
  $PY -m largessl eval finetune --checkpoint "$R/ft-run" --train "$D_TRAIN" --val "$D_VAL" $FT_COMMON $FT_RECIPE \
    train.seed=$seed eval.finetune.seed=$seed
  SUBSET=$($PY -c "import json; print(json.load(open('$R/ft-run/eval/finetune_10pct.json'))['subset_manifest'])")
  $PY -m largessl eval finetune --checkpoint random --out "$R/ft-random" --train "$D_TRAIN" --val "$D_VAL" $FT_COMMON \
    $FT_RECIPE train.seed=$seed "eval.finetune.subset_manifests=[$SUBSET]"
done
$PY - "$OUT" <<'EOF'
import json, math, sys
out = sys.argv[1]
def read(p):
    return json.load(open(p))
rows = []
for s in (0, 1, 2):
    r = f"{out}/seed{s}"
    rows.append({
        "ft": read(f"{r}/ft-run/eval/finetune_10pct.json")["top1"],
        "ft_rand": read(f"{r}/ft-random/eval/finetune_10pct.json")["top1"]})
def ms(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
print("seed  fine-tuned on 10%: pretrained  default init")
for s, r in enumerate(rows):
    print(f"{s}     {r['ft']:.2f}  {r['ft_rand']:.2f}")
for k in ("ft",):
    g = [r[k] - r[k + "_rand"] for r in rows]
    m, sd = ms(g)
    print(f"gain {k}: {m:+.2f} ± {sd:.2f} (mean ± sd over seeds 0-2; per seed {', '.join(f'{x:+.2f}' for x in g)})")
EOF
