# musiclib: every target installs what it needs into .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
MUSICLIB := $(VENV)/bin/musiclib
ROOT ?= data/demo
# The bench corpus (make bench-corpus) and the root the study runs on: data/bench-rendered by default.
KIND ?= rendered
BENCH_ROOT ?= data/bench-$(KIND)
ARGS ?=
STAMP := $(VENV)/.installed
.DEFAULT_GOAL := help

.PHONY: setup test lint demo demo-catalog pretrain embed tune tag suggest study index clean s3 docs-images

-include cluster/cluster.mk

.PHONY: help
# List the targets: each with the first line of the comment above it, up to its first colon or full stop.
help:
	@awk '/^# /{if (!d) {d = substr($$0, 3); sub(/(: |\. |\.$$).*/, "", d)}; next} \
		/^[a-z][a-z0-9-]*( [a-z0-9-]+)*:/ && d {split($$0, t, ":"); printf "  %-18s %s\n", t[1], d} {d = ""}' \
		$(MAKEFILE_LIST)

# .venv, installed by uv: the same packages as pip, from PyPI, downloading in parallel (faster than pip on
# a new machine: docs/BENCHMARKS.md, "make setup"). --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (CI), every process would otherwise compile torch and Ray at each import.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q 'uv>=0.13,<0.14'
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e '.[test]'
	@touch $(STAMP)

# Create .venv and install the project with its test extra (every other target does it first).
setup: $(STAMP)

# Every test, as CI runs them (after the system packages the corpus tests need).
test: $(STAMP) system-deps
	$(PY) -m pytest -q -ra --durations=15

.PHONY: test-fast
# Every test but those marked slow (they start Ray or a server, or wait long): the edit-test loop. CI runs
# make test, all of them.
test-fast: $(STAMP) system-deps
	$(PY) -m pytest -q -ra -m "not slow" --durations=10

# Lint and check formatting with ruff.
lint: $(STAMP)
	$(PY) -m ruff check musiclib jobs tests bench cluster
	$(PY) -m ruff format --check musiclib jobs tests bench cluster

# Generate the demo catalog under ROOT: ARGS="--n-tracks 300 --faults true" changes it.
demo-catalog: $(STAMP)
	$(MUSICLIB) demo-catalog --root $(ROOT) $(ARGS)

# On CPU the demo trains the quarter-width log-mel CNN for 300 steps of 32 clips, without the waveform
# augmentations: on the validation split of a labeled demo catalog it wins against the SampleCNN the demo
# trained before, in less time, and against both random encoders and the log-mel floor (docs/STUDY.md,
# "The demo's encoder"). One worker with two cores computes what two synchronised workers would
# (tests/test_pretrain.py checks that equivalence), faster on 2 cores (docs/BENCHMARKS.md). The DDP path:
# make pretrain ARGS="--num-workers 2 --cpus-per-worker 1"; the papers' encoder: ARGS="--encoder samplecnn".
PRETRAIN_DEMO ?= --encoder melcnn --width 0.25 --num-workers 1 --cpus-per-worker 2 --batch-size 32 \
	--steps 300 --lr 1e-3 --warmup 10 --cosine true --p-chain 0 --p-pitch 0 --log-every 50 --checkpoint-every 150

# Pretrain the encoder on ROOT's catalog: PRETRAIN_DEMO's settings, then ARGS (jobs/pretrain.py).
pretrain: $(STAMP)
	$(MUSICLIB) pretrain --root $(ROOT) $(PRETRAIN_DEMO) $(ARGS)

# Embed every catalog track with the latest model (jobs/embed.py).
embed: $(STAMP)
	$(MUSICLIB) embed --root $(ROOT) $(ARGS)

# Sweep few-shot probes over label budgets and write the report and probe set (jobs/tune.py).
tune: $(STAMP)
	$(MUSICLIB) tune --root $(ROOT) $(ARGS)

# Apply the chosen probes and commit the tags to the Iceberg tag table (jobs/tag.py).
tag: $(STAMP)
	$(MUSICLIB) tag --root $(ROOT) $(ARGS)

# What to label next per tag (after tune): ARGS="--tags bell,drone --per-tag 20".
suggest: $(STAMP)
	$(MUSICLIB) suggest --root $(ROOT) $(ARGS)

# The encoder study (jobs/study.py, docs/STUDY.md): CLMR, SemiSupCon with few and all labels, supervised only,
# the random encoder and a log-mel floor, by the tune job's few-shot protocol, on the bench corpus; outputs under
# BENCH_ROOT/study/<run_id>/ (make study BENCH_ROOT=data/demo for the demo catalog).
study: $(STAMP)
	$(MUSICLIB) study --root $(BENCH_ROOT) $(ARGS)

# The nearest-neighbour index over the latest embeddings: musiclib.tag.tags similar and seed use it; a
# re-run on the same embeddings is a no-op.
index: $(STAMP)
	$(MUSICLIB) index --root $(ROOT) $(ARGS)

# The whole pipeline on the embedded default: local Ray, local files, the generated demo catalog.
demo: $(STAMP)
	$(MAKE) --no-print-directory demo-catalog pretrain embed tune tag ROOT=$(ROOT)
	@echo "--- what each job did (summaries in $(ROOT)/summaries/), and where the outputs are"
	@$(MUSICLIB) tags outputs --root $(ROOT)
	@echo "query: $(MUSICLIB) tags top TAG --root $(ROOT)   (or: show TRACK_ID, sql \"SELECT ... FROM tags\", history)"

# The figures in the docs: the README's budget curve of the latest probe run under ROOT (after make demo)
# and docs/study.png, the plot of the latest study under BENCH_ROOT (after make study).
docs-images: $(STAMP)
	$(PY) -m musiclib.probe.report budget-curve docs/budget_curve.png --root $(ROOT)
	$(PY) -m musiclib.study.study study-plot docs/study.png --root $(BENCH_ROOT)

# Delete ROOT and everything under it.
clean:
	rm -rf $(ROOT)

S3_PORT ?= 8333
S3_DIR ?= data/s3
# A real S3 server on 127.0.0.1: SeaweedFS (from the test extra) on S3_PORT, data under S3_DIR, in the
# foreground until Ctrl-C; it prints the AWS variables to export and a bucket, e.g. ROOT=s3://musiclib/demo.
s3: $(STAMP)
	$(PY) cluster/s3server.py --dir $(S3_DIR) --port $(S3_PORT)

.PHONY: bench-load
# The load test, long and not in CI: embed and tag on a two-node local Ray cluster against SeaweedFS, by
# default catalogs of 1k and 100k tracks (bench/bench_load.py; results in docs/BENCHMARKS.md, "load").
# ARGS="--sizes 1000,5000" sets them.
bench-load: $(STAMP)
	$(PY) -m bench.bench_load $(ARGS)

SYSTEM_DEPS := fluidsynth timgm6mb-soundfont postgresql
.PHONY: system-deps bench-corpus
# The system packages the tests need: FluidSynth, a small GM soundfont and PostgreSQL for the Iceberg catalog
# tests (apt, as root; nothing runs when they are there; without root it names the command). bench-corpus
# installs the rest itself: the full
# FluidR3 soundfont, or for KIND=soundtracks the game music (their sizes: docs/CORPUS.md).
system-deps: $(STAMP)
	$(PY) -m musiclib.datasets.system_packages $(SYSTEM_DEPS)

# The labeled benchmark corpus (docs/CORPUS.md, with its time): KIND=rendered (2,000 tracks of 30 s rendered
# from scores) or KIND=soundtracks (Debian game soundtracks, one tag each), written under BENCH_ROOT (default
# data/bench-KIND). ARGS="--n-tracks 500 --seed 1" sets any option of the job.
bench-corpus: system-deps
	$(MUSICLIB) bench-corpus --root $(BENCH_ROOT) --kind $(KIND) $(ARGS)
