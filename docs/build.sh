#!/usr/bin/env bash
# Build the documentation site into site/: bash docs/build.sh [mkdocs build options]
#
# Needs the docs extra (pip install -e '.[docs]') and npm. The site works
# offline: Mermaid, which draws the diagrams, is served from the site itself.
# It is not kept in git; this script fetches the pinned version from the npm
# registry once (npm pack, then the sha256 of the file is checked) into
# docs/assets/vendor/, where mkdocs copies it into the site. Then, with
# Chromium, docs/check_pages.py looks at the built pages at 1280 px.
set -euo pipefail

MERMAID_VERSION=12.3.0
MERMAID_SHA256=336df803d87a38b70a01e736e666c8f7601d2ce42f5e47c8fafe5d721074b9a3

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=docs/assets/vendor/mermaid.min.js

have_mermaid() {
    [[ -f $target ]] && echo "$MERMAID_SHA256  $target" | sha256sum --check --status
}

if ! have_mermaid; then
    echo "fetching mermaid $MERMAID_VERSION with npm pack"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "mermaid@$MERMAID_VERSION" >/dev/null \
        && tar -xzf "mermaid-$MERMAID_VERSION.tgz" package/dist/mermaid.min.js)
    if ! echo "$MERMAID_SHA256  $tmp/package/dist/mermaid.min.js" | sha256sum --check --status; then
        echo "error: mermaid $MERMAID_VERSION from npm does not have the expected sha256" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$target")"
    mv "$tmp/package/dist/mermaid.min.js" "$target"
fi

export NO_MKDOCS_2_WARNING=1  # the theme's notice about its successor, on every build
"${PYTHON:-python}" -m mkdocs build --strict "$@"

# Then the pages as a reader sees them at 1280 px: no code block cut off at
# its edge, no diagram with text under 12 px (docs/check_pages.py, headless
# Chromium). Only for the default build into site/, and when Chromium is
# there; SKIP_PAGE_CHECK=1 skips it.
if [[ $# -gt 0 || -n ${SKIP_PAGE_CHECK:-} ]]; then
    echo "note: the pages were not checked in a browser (build options given, or SKIP_PAGE_CHECK set)"
elif command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
        || command -v google-chrome >/dev/null; then
    "${PYTHON:-python}" docs/check_pages.py site
else
    echo "note: no Chromium: the pages were not checked in a browser"
fi
