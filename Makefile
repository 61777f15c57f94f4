# Two commands a fresh machine needs (see README "Quick start"):
#   make demo   run the gateway on the embedded store in front of the demo app
#   make test   run every test (unit, integration, Redis; real processes)
# Both install what a fresh Debian machine lacks first (cmake for pingora,
# redis-server and redis-tools for the Redis tests, php-cli for the PHP check,
# chromium and chromium-driver for the demo's browser test).

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test deps bench check k8s-check

deps:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v php >/dev/null || missing="$$missing php-cli"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v psql >/dev/null || missing="$$missing postgresql-client"; \
	command -v mariadb-install-db >/dev/null || missing="$$missing mariadb-server"; \
	command -v mariadb >/dev/null || missing="$$missing mariadb-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

demo: deps
	cargo run -- demo

test: deps
	cargo test
	# Each Criterion bench once, as a test: a bench that panics fails here.
	cargo test --benches

bench: deps
	bench/run

check:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# The Kubernetes manifests render (kubectl kustomize) and every resource
# validates against the Kubernetes API schemas (kubernetes-validate, PyPI).
k8s-check:
	@command -v kubectl >/dev/null || { echo "k8s-check needs kubectl (kustomize built in)"; exit 1; }
	@command -v kubernetes-validate >/dev/null || pip3 install -q kubernetes-validate
	kubectl kustomize deploy/kubernetes > target/kubernetes.yaml
	kubernetes-validate --strict --quiet target/kubernetes.yaml
	@echo "deploy/kubernetes: renders and validates"

