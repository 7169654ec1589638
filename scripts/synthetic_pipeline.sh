#!/usr/bin/env bash
# Issue 13's data pipeline end to end on the embedded default: a synthetic crawl through every stage into the
# adapter trainer's shards, the shipped adapter continued on them and, for comparison, the same continuation on clean
# renderer data. Prints each stage's in → kept → dropped, writes them to $OUT/pipeline_summary.json, and prints the
# quality command that compares the two adapters (what the pipeline's noise and filters cost or buy).
#
#   bash scripts/synthetic_pipeline.sh                          # into ~/.cache/suti/pipeline
#   PAGES=8 EXPERT_STEPS=5 RENDER_STEPS=4 PRIOR_WEIGHT=0 ADAPTER_STEPS=2 OUT=/tmp/p bash scripts/synthetic_pipeline.sh
#   CLIP_MODEL=DIR ...      # run clip-filter with this open_clip folder; unset: models/clip/toy_clip (the toy
#                           # CLIP, thresholds in its clip_filter.toml) if present, else the stage is skipped
#   RUN_QUALITY=1 ...       # also run the quality comparison (minutes to hours on a CPU)
#
# Each stage resumes a run with the same knobs in OUT (other knobs: another OUT). Knobs left unset (RENDER_STEPS,
# PRIOR_WEIGHT, CLIP_CONFIG, FILTER_CONFIG: TOML with the stage's thresholds) keep the stage's own defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/suti/pipeline}
PAGES=${PAGES:-40} SEED=${SEED:-0} WORKERS=${WORKERS:-1} PROMPTS=${PROMPTS:-4} EXPERT_STEPS=${EXPERT_STEPS:-100}
DEMOS=${DEMOS:-3} ADAPTER_STEPS=${ADAPTER_STEPS:-100} BATCH_SIZE=${BATCH_SIZE:-8} ADAPTER_LR=${ADAPTER_LR:-1e-4}
ADAPTER_WARMUP=${ADAPTER_WARMUP:-$((ADAPTER_STEPS / 10))} ADAPTER_EMA=${ADAPTER_EMA:-0.99}
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}  # scripts/setup.sh's venv when there is one
SHIPPED=models/suti/suti_toy_adapter.safetensors

timed() {  # run a command, then say how long it took
    local start=$SECONDS
    "$@"
    echo "  ($((SECONDS - start)) s)"
}
stage() { timed "$PY" -m training.data "$@" --workers "$WORKERS"; }

stage synth-crawl --out "$OUT/crawl" --pages "$PAGES" --seed "$SEED"
stage cluster --in "$OUT/crawl" --out "$OUT/cluster"
stages=("$OUT/crawl" "$OUT/cluster")
captioned=$OUT/cluster
TOY_CLIP=models/clip/toy_clip
if [[ -z ${CLIP_MODEL:-} && -d $TOY_CLIP ]]; then
    CLIP_MODEL=$TOY_CLIP CLIP_CONFIG=${CLIP_CONFIG:-$TOY_CLIP/clip_filter.toml}
fi
if [[ -n ${CLIP_MODEL:-} ]]; then
    stage clip-filter --in "$OUT/cluster" --out "$OUT/clip" --model "$CLIP_MODEL" ${CLIP_CONFIG:+--config "$CLIP_CONFIG"}
    stages+=("$OUT/clip")
    captioned=$OUT/clip
else
    # a random open_clip keeps all or nothing, so without a real one the stage would only pretend to filter
    echo "clip-filter: skipped (CLIP_MODEL unset and no $TOY_CLIP); recaption reads the cluster output"
fi
stage recaption --in "$captioned" --out "$OUT/recaption" --command "$PY -m training.data.toy_captioner"
stage prompts --in "$OUT/recaption" --out "$OUT/prompts" --per-cluster "$PROMPTS" --seed "$SEED"
stage experts --in "$OUT/recaption" --prompts "$OUT/prompts" --out "$OUT/experts" --steps "$EXPERT_STEPS" \
    --seed "$SEED" ${RENDER_STEPS:+--render-steps "$RENDER_STEPS"} ${PRIOR_WEIGHT:+--prior-weight "$PRIOR_WEIGHT"}
stage filter --in "$OUT/experts" --out "$OUT/filter" ${FILTER_CONFIG:+--config "$FILTER_CONFIG"}
if ! compgen -G "$OUT/filter/*.tar" >/dev/null; then
    echo "filter kept no render ($OUT/filter/summary.json): train the experts longer (EXPERT_STEPS, RENDER_STEPS) or" \
         "loosen the filter (FILTER_CONFIG with min_prob, min_confidence)" >&2
    exit 1
fi
stage pack --in "$OUT/filter" --out "$OUT/pack" --demos "$DEMOS" --seed "$SEED"
stages+=("$OUT/recaption" "$OUT/prompts" "$OUT/experts" "$OUT/filter" "$OUT/pack")
echo "== keep numbers per stage (also in $OUT/pipeline_summary.json)"
"$PY" -m training.data.report "${stages[@]}" --json "$OUT/pipeline_summary.json"

adapter() {  # continue the shipped adapter as $1 for ADAPTER_STEPS; the rest: where its examples come from
    local name=$1
    shift
    timed "$PY" -m training.train_adapter --run-dir "$OUT/runs/$name" --resume --init-from "$SHIPPED" \
        --demo-features encoder+decoder --steps "$ADAPTER_STEPS" --batch-size "$BATCH_SIZE" --demos "$DEMOS" \
        --lr "$ADAPTER_LR" --warmup "$ADAPTER_WARMUP" --ema "$ADAPTER_EMA" --seed "$SEED" \
        --export "$OUT/adapter_$name.safetensors" --overwrite "$@"
}
adapter pipeline --shards "$OUT/pack"
adapter renderer

quality=("$PY" -m benchmarks.quality --no-ceilings --json "$OUT/quality.json" --suti "adapter=$SHIPPED,masks=1"
         --suti "adapter=$OUT/adapter_pipeline.safetensors,masks=1"
         --suti "adapter=$OUT/adapter_renderer.safetensors,masks=1")
echo "== quality: shipped adapter vs. continued on pipeline data vs. continued on renderer data"
echo "${quality[*]}"
if [[ ${RUN_QUALITY:-0} == 1 ]]; then
    "${quality[@]}"
fi
