# Each target creates or reuses .venv and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?=
SITE_IDS ?=
SITES ?= 4
BROKER ?= tansu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: up test tools lint report bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Main job: embedded broker, topics, model, controller and replay; ends with a fleet summary.
# BROKER=kafka runs it on Apache Kafka (needs `make tools` first).
up: $(BIN)/.installed
	$(BIN)/dtwin up $(if $(DATA),--data $(DATA)) $(if $(SITE_IDS),--site-ids $(SITE_IDS)) --sites $(SITES) \
	  --broker $(BROKER)

test: $(BIN)/.installed tools
	$(BIN)/ruff check .
	$(BIN)/pytest

# Debian packages: prometheus (promtool and a real server for the dashboard and alert tests), kcat, and
# Java 17+ and Maven for the real Apache Kafka broker; then Kafka's jars (deploy/kafka/pom.xml) into .kafka/lib.
tools: $(BIN)/.installed
	@pkgs=""; \
	{ command -v promtool && command -v prometheus; } >/dev/null || pkgs="$$pkgs prometheus"; \
	command -v kcat >/dev/null || pkgs="$$pkgs kcat"; \
	command -v java >/dev/null || pkgs="$$pkgs default-jre-headless"; \
	command -v mvn >/dev/null || pkgs="$$pkgs maven"; \
	[ -z "$$pkgs" ] || { \
	  echo "installing Debian packages:$$pkgs"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; }
	@$(MAKE) --no-print-directory kafka-jars

.PHONY: kafka-jars
kafka-jars: $(BIN)/.installed
	@$(BIN)/python -c 'from dtwin.kafka_broker import ensure_kafka_jars; print("Kafka jars:", ensure_kafka_jars())'

lint: $(BIN)/.installed
	$(BIN)/ruff check .

DATA_DIR := $(or $(DATA),../shared/datasets/network-operator-kpis)

# The committed offline reports: the paper site (paper protocol) and the fleet (train 1,4; evaluate 1,4,5).
report: $(BIN)/.installed
	$(BIN)/dtwin evaluate --data $(DATA_DIR) --series s1,s11,s31,s41 --out reports/paper
	$(BIN)/dtwin evaluate --data $(DATA_DIR) --site-ids 1,4,5 --train-site-ids 1,4 --model bilstm,delta_mlp \
	  --out reports/fleet

# The model figures of BENCHMARKS.md (after `make report`); the Kafka benchmarks are listed there.
bench: $(BIN)/.installed
	test -f reports/paper/paper.pt -a -f reports/paper/bilstm.pt || $(MAKE) report
	test -f reports/paper/delta_mlp.pt || $(BIN)/dtwin train --model delta_mlp --data $(DATA_DIR) \
	  --series s1,s11,s31,s41 --out reports/paper/delta_mlp.pt
	for k in paper bilstm delta_mlp; do $(BIN)/dtwin export reports/paper/$$k.pt --out artifacts/fleet-bench/$$k; done
	$(BIN)/dtwin bench model artifacts/fleet-bench/paper artifacts/fleet-bench/bilstm artifacts/fleet-bench/delta_mlp \
	  --data $(DATA_DIR) --json reports/bench/model.json

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache .ruff_cache
