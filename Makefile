# ferry — run `make help` for the list of targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin/ferry
DEV   ?= .dev
# Security tests that could not run (not root, say) are listed here by internal/roottest.
SKIPLOG := $(CURDIR)/.security-skips

.PHONY: help build run test test-short interop interop-spire bench scale scale-ci scale-spire proto lint fuzz fuzz-ci clean package
ARCH    ?= $(shell $(GO) env GOARCH)
DIST    ?= dist

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# The version `ferry version` prints: git describe, and the commit, stamped so
# that builds with -buildvcs=false (as CI's) still say where they came from.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS  := -X github.com/ferry-id/ferry/internal/buildinfo.version=$(VERSION) -X github.com/ferry-id/ferry/internal/buildinfo.revision=$(REVISION)
# The packages' version: VERSION without its v, commits after the tag as
# +N.gHASH (0.1.0+33.g1a1bbc9 sorts after 0.1.0 for dpkg and rpm alike).
PKG_VERSION ?= $(shell echo '$(VERSION)' | sed -e 's/^v//' -e 's/-\([0-9]*\)-g/+\1.g/' -e 's/-dirty$$/.dirty/')

build: ## build bin/ferry (version from git describe: bin/ferry version)
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/ferry

run: build ## start everything on this machine (server, agent, bridge, demo API) with embedded defaults in .dev/
	./$(BIN) dev --data-dir $(DEV)

test: ## what every commit must pass: vet, unit, cluster and end-to-end tests with the race detector
	$(GO) vet ./...
	@rm -f $(SKIPLOG)
	FERRY_SECURITY_SKIP_LOG=$(SKIPLOG) $(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v '/test/')
	@# Suites that start real processes pick free loopback ports: one binary at a time.
	FERRY_SECURITY_SKIP_LOG=$(SKIPLOG) $(GO) test -race -count=1 -timeout 20m -p 1 ./test/...
	@if [ -s $(SKIPLOG) ]; then echo "security tests skipped: $$(wc -l < $(SKIPLOG))"; sed 's/^/  /' $(SKIPLOG); \
	else echo "security tests skipped: 0"; fi

test-short: ## the fast unit tier only
	$(GO) test -short -count=1 ./...

interop: ## unmodified go-spiffe and Azure SDK clients against a running ferry (test/interop; SPIRE: interop-spire)
	@if [ -f test/interop/go.mod ]; then cd test/interop && $(GO) test -count=1 -timeout 15m $$($(GO) list ./... | grep -v /interop/spire); \
	else echo "test/interop: no suites yet"; fi

interop-spire: ## SPIRE 1.13.3 as ferry's federation peer: both profiles, rotations on both sides (SPIRE built once, cached in FERRY_SPIRE_CACHE)
	cd test/interop && $(GO) test -count=1 -timeout 40m -v ./spire/

bench: ## benchmarks that print figures (3-node write throughput, the Workload API's calls/s and its canary under attack, package benchmarks); FERRY_BENCH_SPIRE=<dir of spire binaries> adds the side-by-side with SPIRE
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 30m ./test/e2e/
	$(GO) test -run '^$$' -bench . -timeout 30m ./server/... ./bridge/... ./agent/...
	cd test/interop && $(GO) test -run '^$$' -bench IMDSAgentLoad -benchtime 1x -timeout 15m .

fuzz: ## run every fuzz target for FUZZTIME each (default 20s)
	@./scripts/fuzz.sh $${FUZZTIME:-20s}

fuzz-ci: ## every fuzz target for a short budget (FUZZTIME, default 10s), as CI runs them
	@./scripts/fuzz.sh $${FUZZTIME:-10s}

chaos: ## chaos campaign on 3- and 5-node clusters with agents and a bridge, then write and CSR storms; CI runs the defaults (CHAOS_KILLS, CHAOS_PARTITIONS, CHAOS_DURATION, CHAOS_NODES, CHAOS_AGENTS: see RELIABILITY.md)
	FERRY_CHAOS=1 $(GO) test -v -count=1 -timeout $${CHAOS_TIMEOUT:-30m} -run 'TestChaos|TestOverloadSheds|TestCSRStorm' ./test/chaos/

scale: ## fleet-scale harness: real servers and SCALE_AGENTS simulated agents (default 1,000 x 10 entries, 1 node; SCALE_NODES=3 for failover), prints the table of docs/scale.md; knobs in test/scale/doc.go
	FERRY_SCALE=1 $(GO) test -v -count=1 -timeout $${SCALE_TIMEOUT:-120m} -run TestScale ./test/scale/

scale-ci: ## the scale harness at CI size: 3 nodes, 60 agents renewing their SVIDs every minute, failover and whole-cluster restart; fails on a correctness violation only
	SCALE_NODES=3 SCALE_AGENTS=60 SCALE_ENTRIES_PER_AGENT=3 SCALE_GROUPS=3 SCALE_GROUP_ENTRIES=2 SCALE_FLEET_ENTRIES=2 \
	SCALE_CHURN=300 SCALE_CHURN_ROUNDS=1 SCALE_PROBES=10 SCALE_FANOUT_PROBES=2 SCALE_WRITES=60 SCALE_STORM_CSRS=2 \
	SCALE_AGENT_TTL=2m SCALE_SVID_TTL=60 SCALE_REST_SECONDS=3 SCALE_TIMEOUT=20m $(MAKE) --no-print-directory scale

scale-spire: ## ferry and SPIRE 1.13 side by side, alternated: 10k/100k entries (create, RSS, heap, restart) and a fleet of real agents (FERRY_BENCH_AGENTS, default 50); SPIRE=<dir of spire-server and spire-agent>
	@test -n "$(SPIRE)" || { echo "make scale-spire SPIRE=<dir holding spire-server and spire-agent 1.13.3>"; exit 1; }
	FERRY_BENCH_SPIRE=$(abspath $(SPIRE)) nice $(GO) test -run '^$$' -bench ScaleVsSPIRE -benchtime 1x -timeout $${SCALE_TIMEOUT:-180m} ./test/e2e/

proto: ## regenerate proto/ferrypb from proto/*.proto (needs protoc: apt-get install protobuf-compiler)
	./proto/gen.sh

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

package: ## build dist/ferry_VERSION_ARCH.deb and .rpm (static binary, units, configs; nfpm pinned in packaging/go.mod)
	@echo '$(PKG_VERSION)' | grep -q '^[0-9]' || { echo "no release version ('$(VERSION)': no v* tag reachable): make package VERSION=x.y.z"; exit 1; }
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(BIN) ./cmd/ferry
	@mkdir -p $(DIST)
	cd packaging && $(GO) build -o ../bin/nfpm tool
	@# The package holds the binary just built, wherever BIN put it.
	sed 's#^  - src: bin/ferry$$#  - src: $(BIN)#' packaging/nfpm.yaml > $(DIST)/nfpm.yaml
	VERSION=$(PKG_VERSION) ARCH=$(ARCH) ./bin/nfpm package --config $(DIST)/nfpm.yaml --packager deb --target $(DIST)/
	VERSION=$(PKG_VERSION) ARCH=$(ARCH) ./bin/nfpm package --config $(DIST)/nfpm.yaml --packager rpm --target $(DIST)/
	@rm -f $(DIST)/nfpm.yaml
	@ls -l $(DIST)

clean: ## remove build output and the dev data dir
	rm -rf bin $(DIST) $(DEV)
