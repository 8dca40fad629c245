#!/usr/bin/env bash
# Regenerate the shell completion scripts from the installed fdmig.
#
# They are click's own: the output of `_FDMIG_COMPLETE={bash,zsh,fish}_source
# fdmig`. At completion time they call back into fdmig, which offers the
# commands and options, the labels of the running instance (detach,
# status --wait) and the instance names (--name). tests/test_docs.py fails
# when a committed script differs from what the installed fdmig generates.
#
# Usage: completions/generate.sh [FDMIG]   (default: the fdmig in PATH)
set -euo pipefail
cd "$(dirname "$0")"

fdmig=${1:-fdmig}
command -v "$fdmig" >/dev/null || { echo "generate.sh: $fdmig not found; pip install -e . first" >&2; exit 1; }

generate() {  # generate SHELL FILE
    local tmp
    tmp=$(mktemp "$2.XXXXXX")
    # The scripts are written as click emits them, byte for byte.
    if ! _FDMIG_COMPLETE="$1_source" "$fdmig" >"$tmp" || ! [[ -s $tmp ]]; then
        rm -f "$tmp"
        echo "generate.sh: $fdmig produced no $1 completion script" >&2
        exit 1
    fi
    mv "$tmp" "$2"
    chmod 644 "$2"
    echo "wrote completions/$2"
}

"$(dirname "$(command -v "$fdmig")")/python3" -c 'from importlib.metadata import version; print(version("click"))' > click-version 2>/dev/null \
    || python3 -c 'from importlib.metadata import version; print(version("click"))' > click-version
generate bash fdmig.bash
generate zsh _fdmig
generate fish fdmig.fish

# click 8.4.0 and 8.4.1 emit `string split \n` unquoted, a literal line break
# that cuts the fish script in two (pallets/click#3502, fixed in 8.4.2).
if grep -q 'string split *$' fdmig.fish; then
    echo "generate.sh: warning: this click writes a broken fish script" \
         "(pallets/click#3502); upgrade click to 8.4.2 or later and run this again" >&2
fi
