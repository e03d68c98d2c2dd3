#!/usr/bin/env bash
# Runs a dfs-chaos profile with the debug binaries (built by the caller):
#   short    3 nodes, two fixed seeds and one random seed (part of make test)
#   regress  the scenarios in chaos/regress.txt (known defects of e38f196)
#   regress-long  the scenarios in chaos/regress-long.txt (defects found by
#            long runs; 30 minutes each, release binaries; not in make test)
# Every run is tried even if an earlier one fails; the script then exits
# non-zero and prints each failing run's replay command.
set -uo pipefail
cd "$(dirname "$0")/.."
profile=${1:?usage: chaos/profile.sh short|regress}
build=${CHAOS_BUILD:-debug}
bin=target/$build/dfs-chaos
dfs=target/$build/dfs
out=target/chaos/$profile
rm -rf "$out"
failed=()

run() {
	local name=$1
	shift
	echo "chaos-$profile: $name: dfs-chaos $*"
	if ! "$bin" --dfs-bin "$dfs" --out "$out" --run-name "$name" "$@"; then
		failed+=("$name: $bin --dfs-bin $dfs $* (its run directory is named above)")
	fi
}

case $profile in
short)
	# CHAOS_SHORT_MODE=full (the default): every fault and operation kind,
	# fast GC.
	# CHAOS_SHORT_MODE=safe: leaves out what reproduced the known defects of
	# e38f196 (paused uploads, replaced nodes, flipped bytes; see
	# regress.txt) and makes the GC grace longer than any upload can last:
	# for comparing with that commit.
	case ${CHAOS_SHORT_MODE:-full} in
	full) mode=(--faults all --ops all) ;;
	safe) mode=(--faults kill,stop,partition,skew,full --ops put,cancel,delete,get,range,stat,list --gc-grace 45s) ;;
	*)
		echo "CHAOS_SHORT_MODE must be safe or full" >&2
		exit 2
		;;
	esac
	common=(--nodes 3 --replicas 3 --duration "${CHAOS_SHORT_DURATION:-25s}" --heal-timeout 60s --max-size 2MiB "${mode[@]}")
	for seed in ${CHAOS_SHORT_SEEDS:-1033 1053}; do
		run "seed-$seed" --seed "$seed" "${common[@]}"
	done
	seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
	run "random-$seed" --seed "$seed" "${common[@]}"
	;;
regress | regress-long)
	while read -r name args; do
		[[ -z $name || $name == \#* ]] && continue
		# shellcheck disable=SC2086 # the arguments are meant to split
		run "$name" $args
	done <"chaos/$profile.txt"
	;;
*)
	echo "unknown profile $profile" >&2
	exit 2
	;;
esac

if ((${#failed[@]})); then
	echo "chaos-$profile: ${#failed[@]} run(s) found violations; replay with:"
	printf '  %s\n' "${failed[@]}"
	exit 1
fi
echo "chaos-$profile: every run passed"
