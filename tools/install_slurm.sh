#!/usr/bin/env bash
# Install what the SLURM tests need: the Debian/Ubuntu packages of a one-node cluster
# (slurmctld, slurmd, slurm-client, munge). The test suite starts and stops the daemons itself
# (tests/slurm_cluster.py); this script only installs them.
#
#   tools/install_slurm.sh           install when something is missing (needs root or sudo)
#   tools/install_slurm.sh --check   exit 0 when everything is installed, 1 otherwise
#   tools/install_slurm.sh --if-root install only when running as root; otherwise just report
#
# Idempotent: when every program is already there it returns at once without touching apt.
set -euo pipefail

PROGRAMS=(slurmctld slurmd munged sbatch srun squeue scontrol scancel sinfo)
PACKAGES=(slurmctld slurmd slurm-client munge)

missing() {
  local out=()
  for prog in "${PROGRAMS[@]}"; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$prog" >/dev/null 2>&1; then
      out+=("$prog")
    fi
  done
  echo "${out[*]-}"
}

mode="${1:-install}"
gone="$(missing)"
if [[ -z "$gone" ]]; then
  [[ "$mode" == "--check" ]] || echo "install_slurm: slurm and munge are installed"
  exit 0
fi
if [[ "$mode" == "--check" ]]; then
  echo "install_slurm: missing: $gone"
  exit 1
fi

if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
elif [[ "$mode" == "--if-root" ]]; then
  echo "install_slurm: missing ($gone) and not root: the SLURM tests will be skipped" \
    "(run 'sudo tools/install_slurm.sh' to enable them)"
  exit 0
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install_slurm: missing ($gone); run this script as root to install ${PACKAGES[*]}" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: no apt-get here; install ${PACKAGES[*]} with your package manager" >&2
  exit 1
fi

echo "install_slurm: installing ${PACKAGES[*]} (missing: $gone)"
export DEBIAN_FRONTEND=noninteractive
install() {
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
}
# Try the package lists that are there first; refresh them only when that fails.
if ! install 2>/dev/null; then
  "${SUDO[@]}" apt-get update -q >/dev/null
  install
fi

gone="$(missing)"
if [[ -n "$gone" ]]; then
  echo "install_slurm: still missing after install: $gone" >&2
  exit 1
fi
echo "install_slurm: done"
