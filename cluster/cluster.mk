# Submit musiclib's jobs to a Ray cluster's job server (included by the Makefile).
#   make submit JOB=embed ROOT=s3://bucket/catalog ARGS="--decode-cpus 1 --actors 4"
#   make status JOB_ID=raysubmit_...   make logs JOB_ID=...   make stop JOB_ID=...
# RAY_ADDRESS: the job server (default http://127.0.0.1:8265). RUNTIME_ENV: cluster/runtime_env.yaml
# (pip pins, the default) or cluster/runtime_env.local.yaml (nodes already have the packages).
# SUBMIT_FLAGS: more `ray job submit` options, e.g. --no-wait. JOB_ID on submit: the submission id.
# The auth token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; S3 credentials come
# from the nodes' own environment, never from here. Nothing is exported to the other targets.
# An S3 to try this with on one machine: `make s3` (SeaweedFS on 127.0.0.1:8333, data under data/s3) prints
# the AWS_* lines to export in the shells that start the nodes and submit, and a bucket for ROOT.
SUBMIT_ENV = ROOT='$(ROOT)' JOB_ID='$(JOB_ID)' RAY_ADDRESS='$(RAY_ADDRESS)' RUNTIME_ENV='$(RUNTIME_ENV)' \
	SUBMIT_FLAGS='$(SUBMIT_FLAGS)'

.PHONY: submit status logs stop

# Submit a job to the cluster's job server and follow its logs: JOB=pretrain|embed|tune|tag, ROOT, ARGS.
submit: $(STAMP)
	@test -n "$(JOB)" || { echo "usage: make submit JOB=pretrain|embed|tune|tag [ROOT=...] [ARGS=...]" >&2; exit 2; }
	$(SUBMIT_ENV) $(PY) cluster/submit.py submit $(JOB) $(ARGS)

# A submitted job's status, its logs, or stop it: JOB_ID=<submission id>.
status logs stop: $(STAMP)
	@test -n "$(JOB_ID)" || { echo "usage: make $@ JOB_ID=<submission id>" >&2; exit 2; }
	$(SUBMIT_ENV) $(PY) cluster/submit.py $@ $(JOB_ID)
