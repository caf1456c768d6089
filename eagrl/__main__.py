"""``python -m eagrl fit|validate|test|predict|summary --config FILE [--section.key value ...]``."""

from eagrl.cli import main

if __name__ == "__main__":
    main()
