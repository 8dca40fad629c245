# bash completion for fdmig. The script itself comes from the installed fdmig
# when this file is loaded, so it always matches the fdmig and click that run:
# source this file, or put `eval "$(fdmig completion bash)"` in ~/.bashrc.
if command -v fdmig >/dev/null 2>&1; then
    eval "$(fdmig completion bash)"
fi
