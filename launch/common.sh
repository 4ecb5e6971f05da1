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
