# Shared by the launch scripts (sourced, not run): dry-run aware command
# execution, errors, and the pinned versions read from requirements.txt.
# shellcheck shell=bash

DRY_RUN=0

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# quote ARGS...: the arguments as one command line for a POSIX shell; an
# argument with characters outside [A-Za-z0-9_@%+=:,./-] is single-quoted
# (Python's shlex.quote rule, so shlex.split reads the line back exactly).
quote() {
  local arg words=()
  for arg; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s' "${words[*]}"
}

# run CMD...: runs the command, or with --dry_run prints it (shell-quoted, one
# line, nothing else on stdout) instead.
run() {
  if ((DRY_RUN)); then
    quote "$@"
    printf '\n'
  else
    "$@"
  fi
}

# note TEXT: progress for the person at the terminal (stderr, so a dry run's
# stdout holds only the commands).
note() {
  printf '== %s\n' "$*" >&2
}

# pinned PACKAGE: the exact version requirements.txt pins for PACKAGE.
pinned() {
  local version
  version=$(sed -n "s/^$1==//p" "$ROOT/requirements.txt")
  [[ -n $version ]] || die "requirements.txt pins no $1"
  printf '%s' "$version"
}

# usage: prints the running script's header comment (its documentation) and
# exits 0, for -h / --help.
usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
}

# unknown_flag ARG: dies naming ARG, with the likely fix: flags for
# ito_jax.main go after --, and every flag here takes its value after '='.
unknown_flag() {
  case $1 in
    --config.*) die "$1 is a flag of ito_jax.main: put it after -- (... -- $1)" ;;
    --*=*) die "unknown flag $1 (see $0 --help)" ;;
    --*) die "unknown flag $1 (see $0 --help; a flag's value goes after '=', as in --config=FILE)" ;;
    *) die "unexpected argument $1 (see $0 --help; flags for ito_jax.main go after --)" ;;
  esac
}
