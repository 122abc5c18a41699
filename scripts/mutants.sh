#!/usr/bin/env bash
# Mutation check for the integration suite: plant one known bug at a time
# and see which test catches it.
#
#   scripts/mutants.sh [-k] [-no-baseline] [-clean] [NAME...]   (default: every scripts/mutants/*.patch)
#
# For each mutant scripts/mutants/NAME.patch, a throwaway `git worktree` of
# HEAD is made under /tmp, the patch applied there and the relay built from
# it. The tests named by the patch's "# tests: REGEX" line then run from
# this tree with PUSHRELAY_BIN set to the mutant binary: the integration
# tests run the relay as a process, so the mutant is tested without
# touching the working tree. A mutant is CAUGHT when a test fails on it
# that passed on the unpatched HEAD (the baseline, run first with the same
# tests), SURVIVED when every test passes. A patch that no longer applies
# to HEAD is reported as STALE: regenerate it against the current code.
#
# -check only checks that every patch still applies to the working tree,
# builds, and names tests that exist, and exits 1 if one does not: make test
# runs it, so that a change to the code carries its mutants along.
#
# -k keeps the worktrees and logs; -no-baseline trusts that the tests pass
# on HEAD (faster, but a test broken on HEAD then "catches" everything);
# -clean runs the tests as committed (from a worktree of HEAD) rather than
# from this working tree, for when it holds someone's half-done edits.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=/usr/local/go/bin:$PATH

keep=0 baseline=1 clean=0 check=0
names=()
for a in "$@"; do
	case $a in
	-check) check=1 ;;
	-k) keep=1 ;;
	-no-baseline) baseline=0 ;;
	-clean) clean=1 ;;
	-h | --help) sed -n '2,25p' "$0"; exit 0 ;;
	-*) echo "unknown flag $a" >&2; exit 2 ;;
	*) names+=("$a") ;;
	esac
done
if [ ${#names[@]} -eq 0 ]; then
	for p in scripts/mutants/*.patch; do names+=("$(basename "$p" .patch)"); done
fi

if [ $check = 1 ]; then
	# Against the working tree as it is (what make test tests), in a copy
	# of it: git stash would touch the developer's own edits.
	bad=0
	tmp=$(mktemp -d /tmp/pushrelay-mutants-check.XXXXXX)
	trap 'rm -rf "$tmp"' EXIT
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tmp" 2>/dev/null || true
	tests=$(grep -rhoE '^func (Test[A-Za-z0-9_]+)' integration/*_test.go | sed 's/^func //' | sort -u)
	for n in "${names[@]}"; do
		p=$root/scripts/mutants/$n.patch
		if ! (cd "$tmp" && git apply --check "$p" 2>"$tmp/.apply"); then
			echo "STALE    $n: no longer applies; regenerate it against the current code: $(head -1 "$tmp/.apply")"
			bad=1
			continue
		fi
		(cd "$tmp" && git apply "$p")
		(cd "$tmp" && go build ./sidecar/... >"$tmp/.build" 2>&1) || { echo "BROKEN   $n: does not build: $(head -1 "$tmp/.build")"; bad=1; }
		(cd "$tmp" && git apply -R "$p")
		regex=$(sed -n 's/^# tests: *//p' "$p" | head -1)
		[ -n "$regex" ] || { echo "NO TESTS $n: no '# tests:' line"; bad=1; continue; }
		for t in $(echo "$regex" | tr '|' ' '); do
			grep -qx "${t%%/*}" <<<"$tests" || { echo "NO TEST  $n: names $t, which integration/ does not have"; bad=1; }
		done
		echo "ok       $n"
	done
	exit $bad
fi

work=$(mktemp -d /tmp/pushrelay-mutants.XXXXXX)
cleanup() {
	for wt in "$work"/*/; do [ -d "$wt" ] && { git worktree remove --force "$wt" 2>/dev/null || true; }; done
	git worktree prune
	if [ $keep = 0 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

head=$(git rev-parse --short HEAD)
echo "mutants against HEAD $head; work dir $work"

# Where the tests run from, and the Push Stream nginx they need: a worktree
# has no .build/ of its own, nor a ../shared beside it.
testdir=$root
if [ $clean = 1 ]; then
	testdir=$work/tests
	git worktree add -q --detach "$testdir" HEAD
	echo "tests as committed at $head, from $testdir"
fi
if [ -z "${PUSHRELAY_PUSHSTREAM_NGINX:-}" ] && [ -x "$root/.build/pushstream/nginx/sbin/nginx" ]; then
	export PUSHRELAY_PUSHSTREAM_NGINX=$root/.build/pushstream/nginx/sbin/nginx
fi

# testsOf prints the test regex a patch names.
testsOf() { sed -n 's/^# tests: *//p' "scripts/mutants/$1.patch" | head -1; }

# build NAME [PATCH]: a worktree of HEAD, the patch applied, the relay
# built, the worktree removed. Prints the binary's path; returns 3 if the
# patch does not apply, 4 if the mutant does not build.
build() {
	local name=$1 patch=${2:-} wt="$work/$1" rc=0
	git worktree add -q --detach "$wt" HEAD
	if [ -n "$patch" ] && ! git -C "$wt" apply --check "$root/$patch" 2>"$work/$name.apply"; then
		rc=3
	else
		[ -z "$patch" ] || git -C "$wt" apply "$root/$patch"
		(cd "$wt" && go build -o "$work/$name.bin" ./sidecar/cmd/pushrelay) >"$work/$name.build" 2>&1 || rc=4
	fi
	git worktree remove --force "$wt"
	[ $rc = 0 ] && echo "$work/$name.bin"
	return $rc
}

# runTests BIN REGEX LOG: the integration tests matching REGEX against BIN.
# Prints the failed (sub)tests, one a line, or "!ERROR" when the tests did
# not run to the end (build failure, panic, timeout): no verdict then.
runTests() {
	local bin=$1 regex=$2 log=$3 rc=0
	(cd "$testdir" && PUSHRELAY_BIN=$bin go test -count=1 -p 1 -timeout 20m -v -run "$regex" ./integration/) >"$log" 2>&1 || rc=$?
	if ! grep -qE '^(ok|FAIL)\s+github.com/' "$log" || grep -qE '^panic: |\[build failed\]|\[setup failed\]' "$log" ||
		! grep -qE '^\s*--- (PASS|FAIL)' "$log"; then
		echo "!ERROR"
		return
	fi
	grep -E '^\s*--- FAIL: ' "$log" | sed -E 's/^\s*--- FAIL: ([^ ]+).*/\1/' || true
	[ $rc = 0 ] || grep -qE '^\s*--- FAIL: ' "$log" || echo "!ERROR"
}

declare -A failsOnHead=()
if [ $baseline = 1 ]; then
	regexes=()
	for n in "${names[@]}"; do
		[ -f "scripts/mutants/$n.patch" ] && r=$(testsOf "$n") && [ -n "$r" ] && regexes+=("$r")
	done
	all=$(printf '%s\n' "${regexes[@]}" | tr '|' '\n' | sort -u | paste -sd'|')
	echo "== baseline: HEAD unpatched, tests $all"
	bin=$(build baseline) || { echo "baseline: HEAD does not build:"; cat "$work/baseline.build"; exit 1; }
	while read -r t; do
		if [ "$t" = "!ERROR" ]; then
			echo "baseline: the tests did not run to the end on HEAD; see $work/baseline.log"
			keep=1
			exit 1
		fi
		[ -n "$t" ] && failsOnHead[$t]=1 && echo "   fails on HEAD (ignored below): $t"
	done < <(runTests "$bin" "$all" "$work/baseline.log")
	[ ${#failsOnHead[@]} = 0 ] && echo "   every test passes on HEAD"
fi

declare -A result=() by=()
for n in "${names[@]}"; do
	patch="scripts/mutants/$n.patch"
	if [ ! -f "$patch" ]; then result[$n]="MISSING"; continue; fi
	regex=$(testsOf "$n")
	if [ -z "$regex" ]; then result[$n]="NO '# tests:' LINE"; continue; fi
	echo "== $n: tests $regex"
	set +e
	bin=$(build "$n" "$patch")
	rc=$?
	set -e
	case $rc in
	0) ;;
	3)
		result[$n]="STALE"
		by[$n]="patch no longer applies to HEAD $head: regenerate it ($(head -c 200 "$work/$n.apply" | tr '\n' ' '))"
		echo "   STALE: $patch no longer applies to HEAD; regenerate it against the current code"
		continue ;;
	*)
		result[$n]="BUILD FAILED"
		by[$n]=$(head -c 300 "$work/$n.build" | tr '\n' ' ')
		echo "   the mutant does not build: $(cat "$work/$n.build")"
		continue ;;
	esac
	caught=() errored=0
	while read -r t; do
		if [ "$t" = "!ERROR" ]; then errored=1; continue; fi
		[ -n "$t" ] && [ -z "${failsOnHead[$t]:-}" ] && caught+=("$t")
	done < <(runTests "$bin" "$regex" "$work/$n.log")
	if [ $errored = 1 ] && [ ${#caught[@]} = 0 ]; then
		result[$n]="ERROR"
		by[$n]="the tests did not run to the end (build failure, panic or timeout): $work/$n.log"
		keep=1
	elif [ ${#caught[@]} -gt 0 ]; then
		result[$n]="CAUGHT"
		by[$n]="${caught[*]}"
	else
		result[$n]="SURVIVED"
		by[$n]="(ran: $regex)"
	fi
	echo "   ${result[$n]} ${by[$n]}"
done

echo
printf '%-24s %-13s %s\n' MUTANT RESULT "CAUGHT BY (failing tests)"
status=0
for n in "${names[@]}"; do
	printf '%-24s %-13s %s\n' "$n" "${result[$n]}" "${by[$n]:-}"
	[ "${result[$n]}" = CAUGHT ] || status=1
done
exit $status
