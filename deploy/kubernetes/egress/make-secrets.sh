#!/usr/bin/env bash
# Creates the two Secrets the egress manifests read, without writing a password into any file:
#   cliqgate-redis   password=<random>           Redis's requirepass (redis.yaml)
#   cliqgate-config  cliqgate.yaml=<the config>  mounted at /etc/cliqgate (deployment.yaml)
# The config is config/egress.yaml (or --config FILE) with, substituted:
#   store.url       redis://:<password>@redis:6379/0   (cliqgate has no ${ENV} expansion in its
#                                                      config, so the password sits in the URL)
#   store.replicas  4 (--store-replicas N): the Deployment's 3 replicas + 1 draining in a rollout
#   log.format      json
#   reload.watch    true (a changed Secret is reloaded by every replica, no restart)
#   admin.token     <random>, so /admin/ needs `Authorization: Bearer <token>`
# An existing password and admin token are kept, so running it again only updates the config.
#
# Usage: deploy/kubernetes/egress/make-secrets.sh [--config FILE] [--namespace NS] [--store-replicas N]
#        deploy/kubernetes/egress/make-secrets.sh --render [...]   print the config, touch nothing
#          (with REDIS_PASSWORD and ADMIN_TOKEN from the environment, or random ones)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="$here/../../../config/egress.yaml"
namespace=cliqgate
store_replicas=4
render=false
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --namespace) namespace="$2"; shift 2 ;;
        --store-replicas) store_replicas="$2"; shift 2 ;;
        --render) render=true; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

random_hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

existing() { # existing SECRET KEY: the key's value, or nothing
    kubectl -n "$namespace" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null | base64 -d 2>/dev/null || true
}

password="${REDIS_PASSWORD:-}"
admin_token="${ADMIN_TOKEN:-}"
if ! $render; then
    [ -n "$password" ] || password="$(existing cliqgate-redis password)"
    [ -n "$admin_token" ] || admin_token="$(grep -o 'token: "[0-9a-f]*"' <<<"$(existing cliqgate-config cliqgate\\.yaml)" | cut -d'"' -f2 || true)"
fi
[ -n "$password" ] || password="$(random_hex)"
[ -n "$admin_token" ] || admin_token="$(random_hex)"
# Hex only: nothing in the URL needs percent-encoding.
[[ "$password" =~ ^[0-9a-f]{16,}$ ]] || { echo "REDIS_PASSWORD must be 16+ hex digits" >&2; exit 2; }
[[ "$admin_token" =~ ^[0-9a-f]{16,}$ ]] || { echo "ADMIN_TOKEN must be 16+ hex digits" >&2; exit 2; }

rendered="$(mktemp)"
trap 'rm -f "$rendered"' EXIT
# Each substitution must hit exactly one line of the shipped file; anything else means the file
# changed shape and this script needs a look.
substitute() { # substitute FROM TO
    local count
    count="$(grep -cF -- "$1" "$rendered" || true)"
    if [ "$count" != 1 ]; then
        echo "error: expected one line with '$1' in $config, found $count" >&2
        exit 1
    fi
    local from="$1" to="$2"
    FROM="$from" TO="$to" perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$rendered"
}
cp "$config" "$rendered"
substitute 'url: "redis://redis:6379/0"' "url: \"redis://:$password@redis:6379/0\""
substitute '  replicas: 3' "  replicas: $store_replicas"
substitute '  format: pretty' '  format: json'
substitute '  watch: false' '  watch: true'
printf '\nadmin:\n  token: "%s"\n' "$admin_token" >>"$rendered"

if $render; then
    cat "$rendered"
    exit 0
fi

kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"
kubectl -n "$namespace" create secret generic cliqgate-redis \
    --from-literal=password="$password" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$namespace" create secret generic cliqgate-config \
    --from-file=cliqgate.yaml="$rendered" --dry-run=client -o yaml | kubectl apply -f -
echo "Secrets cliqgate-redis and cliqgate-config are in namespace $namespace."
echo "Admin token (for /admin/limits): kubectl -n $namespace get secret cliqgate-config -o jsonpath='{.data.cliqgate\\.yaml}' | base64 -d | tail -n 1"
