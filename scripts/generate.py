"""Sample text from a language-model checkpoint, or time cached against full-forward decoding.

The same program as `advarch-generate` (installed with the package); see `advarch/cli/generate.py`.
"""

from advarch.cli.generate import main

if __name__ == "__main__":
    main()
