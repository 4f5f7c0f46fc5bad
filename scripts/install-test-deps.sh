#!/usr/bin/env bash
# Install what the test suite runs for real: Orthanc (+ DICOMweb plugin), DCMTK, dicom3tools
# (Debian packages) and the test FHIR server's npm packages. Idempotent; does nothing when all
# is already there. Debian packages need root; otherwise it says which command to run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk dicom3tools)
APT_CMD="apt-get update && apt-get install -y --no-install-recommends ${APT_PACKAGES[*]}"

missing=()
[[ -x /usr/sbin/Orthanc ]] || missing+=("/usr/sbin/Orthanc")
[[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] \
  || missing+=("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
command -v storescu >/dev/null 2>&1 || missing+=("storescu")
command -v dciodvfy >/dev/null 2>&1 || missing+=("dciodvfy")

if ((${#missing[@]})); then
  echo "install-test-deps: missing: ${missing[*]}" >&2
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-test-deps: not root; run as root:" >&2
    echo "  sudo sh -c 'DEBIAN_FRONTEND=noninteractive $APT_CMD'" >&2
    exit 1
  fi
  # Keep apt from starting a system-wide Orthanc on 8042/4242 while installing.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
  if ((created_policy)); then
    rm -f "$policy"
    trap - EXIT
  fi
  for tool in /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so; do
    [[ -e "$tool" ]] || { echo "install-test-deps: $tool still missing after install" >&2; exit 1; }
  done
  for tool in storescu dciodvfy; do
    command -v "$tool" >/dev/null 2>&1 \
      || { echo "install-test-deps: $tool still missing after install" >&2; exit 1; }
  done
fi

FHIR_DIR="$ROOT/tests/fhir_server"
if ! command -v npm >/dev/null 2>&1; then
  echo "install-test-deps: npm (Node.js >= 20) is required for the test FHIR server" >&2
  exit 1
fi
if [[ ! -d "$FHIR_DIR/node_modules" || "$FHIR_DIR/package-lock.json" -nt "$FHIR_DIR/node_modules" ]]; then
  (cd "$FHIR_DIR" && npm ci --no-audit --no-fund)
  touch "$FHIR_DIR/node_modules"
fi
