#!/bin/bash
# Session 24 device run: the VLM core (#8), two runs side by side on one H200, bf16 autocast.
#   A: checkpoints/shapes/vlm_lora_gpu continued (merge 2, rank-8 image LoRA), lr 5e-4, instruct only
#   B: from scratch with merge 1 (256 visual tokens of one CLIP patch each), lr 1e-3, align 1/5
# Carries: call 1 .devgguf -> /tmp/c1 (part_a, clip/, vlm_core/); call 2 .devcarry (this script,
# probe2.py, standin.py, gguf_b, wheels/, minilm_cfg/, sw_like/).
# Run as: OUT=$OUT BUDGET=360 bash .devcarry/run.sh   (session 24's call)
# Local dry run (CPU): PY=.venv/bin/python DEV=cpu C1=.devgguf TRAIN=64 PRE=16 PROBE=5 BUDGET=30 \
#   BS=2 TH=1 EXTRA=/tmp/tf517 OUT=/tmp/o bash .devcarry/run.sh
PY=${PY:-python3}; DEV=${DEV:-cuda}; C1=${C1:-/tmp/c1}; C=.devcarry
TRAIN=${TRAIN:-10000}; PRE=${PRE:-10000}; BS=${BS:-32}; BUDGET=${BUDGET:-400}; PROBE=${PROBE:-20}
TH=${TH:-8}; W=${W:-16}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
T0=$(date +%s)
mkdir -p $OUT
pack() {
  for r in a b; do
    if [ -d /tmp/v$r/final ]; then tar -C /tmp/v$r -cf $OUT/vlm_$r.tar final loss.jsonl
    elif [ -d /tmp/v$r/last/weights ]; then tar -C /tmp/v$r -cf $OUT/vlm_$r.tar last/weights loss.jsonl; fi
  done
  ls -la $OUT; echo "total $(( $(date +%s) - T0 ))s"
}
trap pack EXIT
if [ "$DEV" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $C/wheels/*.whl || exit 1
  SITE=/tmp/site:
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
export PYTHONPATH=${SITE}${EXTRA:+$EXTRA:}/tmp/pkgs:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 POLYCHROME_CACHE=/tmp/pc
$PY $C/standin.py /tmp/pkgs $C1/part_a,$C/gguf_b $SHA $C/minilm_cfg || exit 1
mkdir -p checkpoints/shapes && rm -rf checkpoints/shapes/clip && cp -r $C1/clip checkpoints/shapes/clip
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
rm -rf /tmp/sw /tmp/probes /tmp/va /tmp/vb; mkdir -p /tmp/probes
$PY -c "from core.sources import resolve_source; resolve_source('smollm2-135m-instruct')" > $OUT/warm.log 2>&1 &
$PY -m data.shapeworld generate --like $C/sw_like --out /tmp/sw --train $TRAIN --val 0 --test 0 --pretrain $PRE --workers $W > $OUT/datagen.log 2>&1 || { tail $OUT/datagen.log; exit 1; }
wait; tail -2 $OUT/warm.log
md5sum /tmp/sw/annotations/captions_*.json
COMMON="--preset shapes --data /tmp/sw --splits train pretrain --batch-size $BS --lora-rank 8 --device $DEV --threads $TH --no-progress"
A="$COMMON --merge 2 --init-from $C1/vlm_core --lr 5e-4 --seed 2"
B="$COMMON --merge 1 --lr 1e-3 --seed 0"
RATES=$($PY $C/probe2.py $PROBE /tmp/probes "$A" "$B"); tail -n 2 /tmp/probes/probe_0.log /tmp/probes/probe_1.log
RA=$(echo "$RATES" | sed -n 1p); RB=$(echo "$RATES" | sed -n 2p)
SA=$($PY -c "print(max(10, int($RA * $BUDGET * 0.95)))"); SB=$($PY -c "print(max(10, int($RB * $BUDGET * 0.95)))")
AB=$($PY -c "print(max(2, $SB // 5))"); MIN=$($PY -c "print(round($BUDGET / 60 * 1.05, 2))")
echo "probe: A $RA steps/s, B $RB steps/s; setup+probe $(( $(date +%s) - T0 ))s; A $SA steps, B $SB steps ($AB align), ~${BUDGET}s"
$PY -m train.vlm $A --out /tmp/va --steps $SA --align-steps 0 --save-every 200 --max-minutes $MIN > $OUT/train_a.log 2>&1 &
$PY -m train.vlm $B --out /tmp/vb --steps $SB --align-steps $AB --save-every 200 --max-minutes $MIN > $OUT/train_b.log 2>&1; wait
tail -n 4 $OUT/train_a.log $OUT/train_b.log
