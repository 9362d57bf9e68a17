# musiclib: every target installs what it needs into .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
ROOT ?= data/demo
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo demo-catalog pretrain embed tune tag suggest study index clean s3 docs-images

-include cluster/cluster.mk

# uv installs the same packages as pip, from PyPI, downloading in parallel (about 80 s instead of about
# 2 minutes on a new machine: docs/BENCHMARKS.md, "make setup"). --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (CI), every process would otherwise compile torch and Ray at each import.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q 'uv>=0.13,<0.14'
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest -q -ra --durations=15

# The edit-test loop: every test but those marked slow (they start Ray or a server, or wait long); CI runs
# make test, all of them.
.PHONY: test-fast
test-fast: $(STAMP) system-deps
	$(PY) -m pytest -q -ra -m "not slow" --durations=10

lint: $(STAMP)
	$(PY) -m ruff check musiclib jobs tests bench cluster
	$(PY) -m ruff format --check musiclib jobs tests bench cluster

demo-catalog: $(STAMP)
	$(PY) jobs/make_demo_catalog.py --root $(ROOT) $(ARGS)

# On CPU the demo trains the quarter-width encoder for 100 steps of 20 clips (the compute of 60 steps of 32):
# chosen on the validation split of a 900-track labeled catalog, where it is the setting tried that lands
# above the random encoder at this cost (docs/STUDY.md, "The demo's encoder against the random one").
# Pitch shift is off (at p = 1 it costs 40 % of a CPU step).
# One worker with two cores computes what two synchronised workers would (tests/test_pretrain.py checks that
# equivalence), about a fifth faster on 2 cores (docs/BENCHMARKS.md). The DDP path:
# make pretrain ARGS="--num-workers 2 --cpus-per-worker 1".
PRETRAIN_DEMO ?= --width 0.25 --num-workers 1 --cpus-per-worker 2 --batch-size 20 --steps 100 --lr 1e-3 \
	--warmup 10 --cosine true --log-every 20 --checkpoint-every 50 --p-pitch 0

pretrain: $(STAMP)
	$(PY) jobs/pretrain.py --root $(ROOT) $(PRETRAIN_DEMO) $(ARGS)

embed: $(STAMP)
	$(PY) jobs/embed.py --root $(ROOT) $(ARGS)

tune: $(STAMP)
	$(PY) jobs/tune.py --root $(ROOT) $(ARGS)

tag: $(STAMP)
	$(PY) jobs/tag.py --root $(ROOT) $(ARGS)

# What to label next per tag (after tune): ARGS="--tags bell,drone --per-tag 20".
suggest: $(STAMP)
	$(PY) jobs/suggest.py --root $(ROOT) $(ARGS)

# The encoder study (jobs/study.py, docs/STUDY.md): CLMR, SemiSupCon with few and all labels, supervised only,
# the random encoder and a log-mel floor, by the tune job's few-shot protocol; outputs under ROOT/study/<run_id>/.
# ROOT defaults to the bench corpus here, data/bench-rendered (make study ROOT=data/demo for the demo catalog).
study: STUDY_ROOT := $(if $(filter file,$(origin ROOT)),data/bench-rendered,$(ROOT))
study: $(STAMP)
	$(PY) jobs/study.py --root $(STUDY_ROOT) $(ARGS)

# The nearest-neighbour index over the latest embeddings (musiclib.tag.tags similar / seed use it); a re-run
# on the same embeddings is a no-op.
index: $(STAMP)
	$(PY) jobs/index.py --root $(ROOT) $(ARGS)

# The whole pipeline on the embedded default (local Ray, local files, the generated demo catalog).
demo: $(STAMP)
	$(MAKE) --no-print-directory demo-catalog pretrain embed tune tag ROOT=$(ROOT)
	@echo "--- what each job did (summaries in $(ROOT)/summaries/), and where the outputs are"
	@$(PY) -m musiclib.tag.tags outputs --root $(ROOT)
	@echo "query: $(PY) -m musiclib.tag.tags top TAG --root $(ROOT)   (or: show TRACK_ID, sql \"SELECT ... FROM tags\", history)"

# The README's figures: the budget curve of the latest probe run under ROOT (after make demo) and the plot of
# the latest study under BENCH_ROOT (after make study).
docs-images: $(STAMP)
	$(PY) -m musiclib.probe.report budget-curve docs/budget_curve.png --root $(ROOT)
	$(PY) -m musiclib.study.study study-plot docs/study.png --root $(BENCH_ROOT)

clean:
	rm -rf $(ROOT)

# A real S3 server (SeaweedFS, from the test extra) on 127.0.0.1:$(S3_PORT), in the foreground until Ctrl-C, with its
# data under $(S3_DIR); it prints the AWS variables to export and a bucket to try, e.g. ROOT=s3://musiclib/demo.
S3_PORT ?= 8333
S3_DIR ?= data/s3
s3: $(STAMP)
	$(PY) cluster/s3server.py --dir $(S3_DIR) --port $(S3_PORT)

# Load test, not in CI (~1 h on 2 cores): embed and tag on the two-node local Ray cluster against SeaweedFS,
# catalogs of 1k and 100k tracks (bench/bench_load.py; results in docs/BENCHMARKS.md). ARGS="--sizes 1000,5000".
.PHONY: bench-load
bench-load: $(STAMP)
	$(PY) bench/bench_load.py $(ARGS)

# System packages (apt, as root; idempotent: nothing runs when they are there; without root it names the
# command). The tests need FluidSynth and a 6 MB GM soundfont. bench-corpus installs the rest itself: the
# 142 MB FluidR3 soundfont, or for KIND=soundtracks the game music (~300 MB).
SYSTEM_DEPS := fluidsynth timgm6mb-soundfont
.PHONY: system-deps bench-corpus
system-deps: $(STAMP)
	$(PY) -m musiclib.datasets.system_packages $(SYSTEM_DEPS)

# The labeled benchmark corpus (docs/CORPUS.md): KIND=rendered (2,000 tracks of 30 s rendered from scores,
# about 15 min on 2 idle cores) or KIND=soundtracks (Debian game soundtracks, one tag each), written under
# BENCH_ROOT (default data/bench-KIND). ARGS="--n-tracks 500 --seed 1" sets any option of the job.
KIND ?= rendered
BENCH_ROOT ?= data/bench-$(KIND)
bench-corpus: system-deps
	$(PY) jobs/make_bench_corpus.py --root $(BENCH_ROOT) --kind $(KIND) $(ARGS)
