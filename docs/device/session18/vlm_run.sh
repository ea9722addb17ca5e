#!/bin/bash
# Session 18 device run: the VLM core (#8) on a GPU (docs/GPU.md, "The VLM core on a GPU").
# It runs from .devcarry/ (git-ignored), beside standin.py and probe.py, the wheels, gguf_b, clip/,
# sw_like/shapeworld.json and minilm_cfg/. Run as: OUT=$OUT BUDGET=360 bash .devcarry/vlm_run.sh
# Local dry run first (CPU, tiny data):
#   PY=.venv/bin/python DEV=cpu PARTA=.devgguf/part_a TRAIN=64 PRE=0 PROBE=10 BUDGET=60 BS=2 OUT=/tmp/o bash .devcarry/vlm_run.sh
PY=${PY:-python3}; DEV=${DEV:-cuda}; PARTA=${PARTA:-/tmp/llm/part_a}
TRAIN=${TRAIN:-10000}; PRE=${PRE:-10000}; BS=${BS:-32}; BUDGET=${BUDGET:-330}; PROBE=${PROBE:-25}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
T0=$(date +%s)
mkdir -p $OUT
if [ "$DEV" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .devcarry/wheels/*.whl || exit 1
  SITE=/tmp/site:
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
export PYTHONPATH=${SITE}/tmp/pkgs:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 POLYCHROME_CACHE=/tmp/pc
$PY .devcarry/standin.py /tmp/pkgs $PARTA,.devcarry/gguf_b $SHA .devcarry/minilm_cfg || exit 1
mkdir -p checkpoints/shapes && rm -rf checkpoints/shapes/clip && cp -r .devcarry/clip checkpoints/shapes/clip
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
rm -rf /tmp/sw /tmp/probe /tmp/vlm
$PY -m data.shapeworld generate --like .devcarry/sw_like --out /tmp/sw --train $TRAIN --val 0 --test 0 --pretrain $PRE --workers 16 > $OUT/datagen.log 2>&1 || { tail $OUT/datagen.log; exit 1; }
md5sum /tmp/sw/annotations/captions_*.json
ARGS="--preset shapes --data /tmp/sw --splits train pretrain --batch-size $BS --lr 1e-3 --lora-rank 8 --merge 2 --device $DEV --no-bf16 --threads 8 --no-progress"
# probe: the step rate at this batch size (the dequantised LLM is cached for the real run)
RATE=$($PY .devcarry/probe.py $PROBE $OUT/probe.log $ARGS); tail -2 $OUT/probe.log
echo "probe: $RATE steps/s"
ELAPSED=$(( $(date +%s) - T0 ))
STEPS=$($PY -c "print(max(20, int($RATE * $BUDGET * 0.95)))")
ALIGN=$($PY -c "print(max(5, $STEPS // 5))")
echo "setup+probe ${ELAPSED}s; training $STEPS steps ($ALIGN align) in ~${BUDGET}s"
$PY -m train.vlm $ARGS --out /tmp/vlm --steps $STEPS --align-steps $ALIGN --save-every 250 --max-minutes $($PY -c "print($BUDGET/60*1.08)") > $OUT/train.log 2>&1
tail -12 $OUT/train.log
tar -C /tmp/vlm -cf $OUT/vlm_final.tar final loss.jsonl
ls -la $OUT; echo "total $(( $(date +%s) - T0 ))s"
