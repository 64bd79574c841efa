#!/usr/bin/env bash
# The recipes of this round's test-split candidates (issue 16), as run on a 2-core CPU (one core each;
# about 25 min per 160-px LP-FT run, 5 min per linear probe). Usage:
#   bash scripts/candidates.sh [DATA] [OUT]      (default ../shared/data/chest_xray, runs/candidates)
# then pack each finished model for the repository: python scripts/pack_candidate.py OUT/NAME candidates/NAME
set -euo pipefail
DATA=${1:-../shared/data/chest_xray}
R=${2:-runs/candidates}
P="${PNEUMOSCAN:-pneumoscan} -q"
mkdir -p "$R"
M=$R/manifest.csv
step() { local name=$1; shift; [ -f "$R/$name/config.json" ] || [ -f "$R/$name/pretrain.json" ] && { echo "skip $name"; return; }
        echo "run $name"; "$@"; }
[ -f "$M" ] || $P data index "$DATA" --out "$M" --seed 0
AUG="--blur 1.0 --noise 0.02 --erase 0.25"   # noise and blur before CLAHE, random erasing
LPFT="--intensity clahe --lr 2e-4 --head-lr-mult 1 --layer-decay 0.8 --freeze-bn --warmup-epochs 0.5 --batch-size 32"
# 1. linear probe on frozen ImageNet features (the MedMNIST+ finding: probes hold best on the test split)
step lp-clahe-160 $P train "$M" --out "$R/lp-clahe-160" --intensity clahe --size 160
# 2. LP-FT from that probe: layer-wise decay 0.8, frozen batch norm, shortcut-attacking augmentation
for s in 0 1 2; do
  step lpft-clahe-160-s$s $P finetune "$M" --out "$R/lpft-clahe-160-s$s" --size 160 $LPFT $AUG --epochs 6 --seed $s \
    --init-from "$R/lp-clahe-160"
done
# 3. a uniform soup of the three (one network) and WiSE-FT halfway between the probe and the soup
step soup-lpft-clahe-160 $P soup "$R"/lpft-clahe-160-s{0,1,2} --out "$R/soup-lpft-clahe-160"
# (WiSE-FT: a candidate until the seventh session)
step wise-clahe-160 $P soup "$R/lp-clahe-160" "$R/soup-lpft-clahe-160" --coefficients 0.5,0.5 --out "$R/wise-clahe-160"
# 4. cross-architecture frozen probes at 224 px and their ensemble
step lp-clahe-224 $P train "$M" --out "$R/lp-clahe-224" --intensity clahe
step lp-lite1-clahe-224 $P train "$M" --out "$R/lp-lite1-clahe-224" --backbone efficientnet_lite1 --size 224 --intensity clahe
step lp-lite2-clahe-224 $P train "$M" --out "$R/lp-lite2-clahe-224" --backbone efficientnet_lite2 --size 224 --intensity clahe
step ens-lp-lite012 $P ensemble "$R/lp-clahe-224" "$R/lp-lite1-clahe-224" "$R/lp-lite2-clahe-224" --out "$R/ens-lp-lite012"
# 5. noisy labels: generalised cross-entropy, the 5 % highest-loss training images dropped, mixup, at 128 px
step lp-clahe-128 $P train "$M" --out "$R/lp-clahe-128" --intensity clahe --size 128
step lpft-gce-drop-128 $P finetune "$M" --out "$R/lpft-gce-drop-128" --size 128 $LPFT $AUG --epochs 8 --seed 0 \
  --init-from "$R/lp-clahe-128" --loss gce --drop-noisy 0.05 --mixup 0.2
# 6. self-supervised features: SimCLR on the training X-rays (a GPU job: 132 s for 60 epochs on one H200),
#    then a linear probe on them, LP-FT from that probe with the recipe above (3 seeds) and their uniform soup
#    (SSL=0 skips these), and that soup in an ensemble with the ImageNet one
if [ "${SSL:-1}" = 1 ]; then
  step ssl-160 $P pretrain "$M" --out "$R/ssl-160" --size 160 --intensity clahe --epochs 60
  step ssl-lp-clahe-160 $P train "$M" --out "$R/ssl-lp-clahe-160" --weights "$R/ssl-160/backbone.safetensors" \
    --size 160 --intensity clahe
  for s in 0 1 2; do
    step ssl-lpft-clahe-160-s$s $P finetune "$M" --out "$R/ssl-lpft-clahe-160-s$s" --size 160 $LPFT $AUG --epochs 6 \
      --seed $s --init-from "$R/ssl-lp-clahe-160"
  done
  step soup-ssl-lpft-clahe-160 $P soup "$R"/ssl-lpft-clahe-160-s{0,1,2} --out "$R/soup-ssl-lpft-clahe-160"
  # the two soups, ImageNet features and SimCLR features, as one ensemble (different features, different errors)
  step ens-soups-ssl-imagenet-160 $P ensemble "$R/soup-lpft-clahe-160" "$R/soup-ssl-lpft-clahe-160" \
    --out "$R/ens-soups-ssl-imagenet-160"
fi
# 7. the shipped default (candidates/soup-shipped) is made by scripts/make_default_model.sh (fine-tuned on a GPU:
#    about 50 s per member on one H200)
