#!/bin/bash
# Session 19 device run: STAMP (#11) on a GPU, two runs side by side on one H200 (docs/GPU.md).
#   A: the committed STAMP (moved onto vlm_lora_gpu, <seg> row refit) continued, mask loss only
#   B: STAMP from scratch on vlm_lora_gpu with the paper's wiring (--mask-merge 0), LM loss on
# Carries: call 1 .devgguf (part_a -> /tmp/llm), call 2 .devcarry2 (-> /tmp/c2: gguf_b, stamp/,
# vlm_core/, minilm_cfg/, sw_like/), call 3 .devcarry3 (wheels/, clip/, these scripts).
# Run as: OUT=$OUT BUDGET=420 bash .devcarry3/stamp_run.sh
# Local dry run (CPU): PY=.venv/bin/python DEV=cpu PARTA=.devgguf/part_a C2=.devcarry2 TRAIN=64 \
#   PROBE=5 BUDGET=40 BS=2 OUT=/tmp/o bash .devcarry3/stamp_run.sh
PY=${PY:-python3}; DEV=${DEV:-cuda}; PARTA=${PARTA:-/tmp/llm/part_a}; C2=${C2:-/tmp/c2}; C3=.devcarry3
TRAIN=${TRAIN:-10000}; BS=${BS:-32}; BUDGET=${BUDGET:-420}; PROBE=${PROBE:-20}; TH=${TH:-6}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
T0=$(date +%s)
mkdir -p $OUT
if [ "$DEV" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $C3/wheels/*.whl || exit 1
  SITE=/tmp/site:
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
export PYTHONPATH=${SITE}${EXTRA:+$EXTRA:}/tmp/pkgs:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 POLYCHROME_CACHE=/tmp/pc
$PY $C3/standin.py /tmp/pkgs $PARTA,$C2/gguf_b $SHA $C2/minilm_cfg || exit 1
mkdir -p checkpoints/shapes && rm -rf checkpoints/shapes/clip && cp -r $C3/clip checkpoints/shapes/clip
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
rm -rf /tmp/sw /tmp/pa /tmp/pb /tmp/sa /tmp/sb
$PY -m data.shapeworld generate --like $C2/sw_like --out /tmp/sw --train $TRAIN --val 0 --test 0 --pretrain 0 --workers 16 > $OUT/datagen.log 2>&1 || { tail $OUT/datagen.log; exit 1; }
md5sum /tmp/sw/annotations/refs_train.json /tmp/sw/annotations/instances_train.json
COMMON="--data /tmp/sw --batch-size $BS --lr 2e-3 --device $DEV --bf16 --threads $TH --no-progress"
A="--init-from $C2/stamp --lm-weight 0 --negatives 0 $COMMON"
B="--vlm $C2/vlm_core --mask-merge 0 --negatives 1 $COMMON"
# probe both side by side: each one's step rate beside the other (the dequantised LLM is cached)
$PY $C3/probe_stamp.py $PROBE $OUT/probe_a.log /tmp/pa $A > /tmp/rate_a &
sleep 2; $PY $C3/probe_stamp.py $PROBE $OUT/probe_b.log /tmp/pb $B > /tmp/rate_b; wait
RA=$(cat /tmp/rate_a); RB=$(cat /tmp/rate_b); tail -n 3 $OUT/probe_a.log $OUT/probe_b.log
ELAPSED=$(( $(date +%s) - T0 ))
SA=$($PY -c "print(max(10, int($RA * $BUDGET * 0.93)))"); SB=$($PY -c "print(max(10, int($RB * $BUDGET * 0.93)))")
MIN=$($PY -c "print(round($BUDGET / 60 * 1.02, 2))")
echo "probe: A $RA steps/s, B $RB steps/s; setup+probe ${ELAPSED}s; A $SA steps, B $SB steps, in ~${BUDGET}s"
$PY -m train.stamp $A --out /tmp/sa --steps $SA --save-every 200 --max-minutes $MIN > $OUT/train_a.log 2>&1 &
$PY -m train.stamp $B --out /tmp/sb --steps $SB --save-every 200 --max-minutes $MIN > $OUT/train_b.log 2>&1; wait
tail -n 4 $OUT/train_a.log $OUT/train_b.log
for r in a b; do
  d=/tmp/s$r/final; [ -d $d ] || d=/tmp/s$r/last
  $PY -c "import sys, torch; from vlm.stamp import StampVLM; StampVLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.float16)" $d /tmp/s${r}_fp16 \
    && cp /tmp/s$r/loss.jsonl /tmp/s${r}_fp16/ && cp /tmp/s$r/final/manifest.json /tmp/s${r}_fp16/run_manifest.json 2>/dev/null
  tar -C /tmp -cf $OUT/stamp_$r.tar s${r}_fp16
done
ls -la $OUT; nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null; echo "total $(( $(date +%s) - T0 ))s"
