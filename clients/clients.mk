# Makefile fragment for the generated API clients (Go, Python, TypeScript)
# and their tests. The top-level Makefile includes it:
#
#     include clients/clients.mk
#
# Targets:
#   clients              regenerate the Go, Python and TypeScript stubs from proto/
#   clients-deps         install everything the client tests need (idempotent)
#   clients-test         build the node, start it, run every client suite against it
#   clients-check-drift  regenerate, then fail if that changed anything under clients/
#
# Every tool comes from a package registry at a pinned version: buf and
# protoc-gen-es from npm (clients/ts/package-lock.json), protoc-gen-go,
# protoc-gen-go-grpc and grpcurl via `go install`, grpcio-tools and pytest
# from PyPI (clients/python/requirements-dev.txt). They are installed under
# clients/.tools and clients/ts/node_modules, both git-ignored.

# The directory of this fragment, as seen from the including Makefile.
CLIENTS_DIR ?= $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
CLIENTS_ROOT := $(abspath $(CLIENTS_DIR)/..)
CLIENTS_TOOLS := $(abspath $(CLIENTS_DIR))/.tools
CLIENTS_VENV := $(CLIENTS_TOOLS)/venv
CLIENTS_BIN := $(CLIENTS_TOOLS)/bin

CLIENTS_GO ?= go
CLIENTS_NPM ?= npm
CLIENTS_PYTHON ?= python3
CLIENTS_CARGO ?= cargo

PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GRPCURL_VERSION := v1.9.4

CLIENTS_PY_SOURCES := $(CLIENTS_DIR)/python/pyproject.toml \
	$(wildcard $(CLIENTS_DIR)/python/src/dfs_client/*.py \
	           $(CLIENTS_DIR)/python/src/dfs_client/v1/*.py \
	           $(CLIENTS_DIR)/python/src/dfs_client/v1/*.pyi)

.PHONY: clients clients-deps clients-gen-tools clients-test clients-check-drift

# --- tool installs (stamped, so repeating them is cheap) -----------------------

$(CLIENTS_TOOLS)/stamps/protoc-gen-go-$(PROTOC_GEN_GO_VERSION):
	GOBIN=$(CLIENTS_BIN) $(CLIENTS_GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	@mkdir -p $(@D) && touch $@

$(CLIENTS_TOOLS)/stamps/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION):
	GOBIN=$(CLIENTS_BIN) $(CLIENTS_GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	@mkdir -p $(@D) && touch $@

$(CLIENTS_TOOLS)/stamps/grpcurl-$(GRPCURL_VERSION):
	GOBIN=$(CLIENTS_BIN) $(CLIENTS_GO) install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
	@mkdir -p $(@D) && touch $@

# Python venv with the pinned generator and test tools.
$(CLIENTS_VENV)/.stamp-tools: $(CLIENTS_DIR)/python/requirements-dev.txt
	test -x $(CLIENTS_VENV)/bin/python || $(CLIENTS_PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(CLIENTS_DIR)/python/requirements-dev.txt
	touch $@

# The dfs_client package itself, installed (not editable) so the tests see
# what `pip install ./clients/python` gives a user.
$(CLIENTS_VENV)/.stamp-package: $(CLIENTS_VENV)/.stamp-tools $(CLIENTS_PY_SOURCES)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall $(CLIENTS_DIR)/python
	rm -rf $(CLIENTS_DIR)/python/build $(CLIENTS_DIR)/python/src/*.egg-info
	touch $@

# npm ci wipes node_modules, so the stamp lives inside it.
$(CLIENTS_DIR)/ts/node_modules/.stamp: $(CLIENTS_DIR)/ts/package-lock.json $(CLIENTS_DIR)/ts/package.json
	cd $(CLIENTS_DIR)/ts && $(CLIENTS_NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

clients-gen-tools: \
	$(CLIENTS_TOOLS)/stamps/protoc-gen-go-$(PROTOC_GEN_GO_VERSION) \
	$(CLIENTS_TOOLS)/stamps/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION) \
	$(CLIENTS_VENV)/.stamp-tools \
	$(CLIENTS_DIR)/ts/node_modules/.stamp

clients-deps: clients-gen-tools \
	$(CLIENTS_TOOLS)/stamps/grpcurl-$(GRPCURL_VERSION) \
	$(CLIENTS_VENV)/.stamp-package
	cd $(CLIENTS_DIR)/go && $(CLIENTS_GO) mod download

# --- generation ----------------------------------------------------------------

# Go and TypeScript with buf (clients/buf.gen.yaml), Python with grpcio-tools
# (clients/python/generate.py). Old output is removed first so stubs for
# deleted protos do not linger.
clients: clients-gen-tools
	rm -f $(CLIENTS_DIR)/go/dfsv1/*.pb.go
	rm -rf $(CLIENTS_DIR)/ts/gen
	cd $(CLIENTS_DIR) && PATH="$(CLIENTS_BIN):$$PATH" ts/node_modules/.bin/buf generate
	$(CLIENTS_VENV)/bin/python $(CLIENTS_DIR)/python/generate.py

clients-check-drift: clients
	git diff --exit-code -- $(CLIENTS_DIR)
	@untracked="$$(git ls-files --others --exclude-standard -- $(CLIENTS_DIR))"; \
	if [ -n "$$untracked" ]; then \
		echo "clients-check-drift: generation left untracked files:"; echo "$$untracked"; exit 1; \
	fi
	@echo "clients-check-drift: generated clients are up to date"

# --- tests ---------------------------------------------------------------------

clients-test: clients-deps
	cd $(CLIENTS_ROOT) && $(CLIENTS_CARGO) build --release
	DFS_BIN=$(CLIENTS_ROOT)/target/release/dfs bash $(CLIENTS_DIR)/run-tests.sh
