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

# The committed offline report (reports/paper/) on the real data.
report: $(BIN)/.installed
	$(BIN)/dtwin evaluate --data $(or $(DATA),../shared/datasets/network-operator-kpis) --out reports/paper

# The figures in BENCHMARKS.md: models from `make report`, exported, then both benchmarks.
bench: $(BIN)/.installed
	test -f reports/paper/paper.pt -a -f reports/paper/delta_mlp.pt || $(MAKE) report
	$(BIN)/dtwin export reports/paper/paper.pt --out artifacts/paper
	$(BIN)/dtwin export reports/paper/delta_mlp.pt --out artifacts/delta_mlp
	$(BIN)/dtwin export reports/paper/delta_mlp.pt --out artifacts/delta_mlp-int8 --int8
	$(BIN)/dtwin bench model artifacts/paper artifacts/delta_mlp artifacts/delta_mlp-int8 \
	  --data $(or $(DATA),../shared/datasets/network-operator-kpis) --json reports/bench/model.json
	$(BIN)/dtwin bench loop --samples 50000 --sites 100 --model-dir artifacts/delta_mlp --json reports/bench/loop.json

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache .ruff_cache
