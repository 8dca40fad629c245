# fish completion for fdmig. The script itself comes from the installed fdmig
# when fish loads this file, so it always matches the fdmig and click that run:
# put this file in ~/.config/fish/completions/, or `fdmig completion fish |
# source` in ~/.config/fish/config.fish.
if command -q fdmig
    fdmig completion fish | source
end
