#!/usr/bin/env bash
# The unprivileged tier: `pytest -m "not mount"` as user 65534 (nobody, no groups, no
# capabilities) with /dev/fuse hidden, on a copy of this checkout that the user can read
# but not write. Every test that needs root or /dev/fuse must carry the `mount` marker;
# this run shows which do not. Run it as root (it needs unshare and setpriv); run by any
# other user it runs the tier in place as that user. Extra arguments go to pytest, e.g.
# `bash scripts/test_unprivileged.sh tests/test_cli.py -k region`.
set -euo pipefail
cd "$(dirname "$0")/.."
python="$PWD/.venv/bin/python"
[ -x "$python" ] || { echo "test_unprivileged: no .venv here (run scripts/setup.sh)" >&2; exit 1; }
pytest_args=(-m pytest -q -p no:cacheprovider -m "not mount" "$@")

finish() {
    if [ "$1" -eq 5 ]; then
        echo "test_unprivileged: pytest collected no tests" >&2
    fi
    exit "$1"
}

if [ "$(id -u)" -ne 0 ]; then
    rc=0
    "$python" "${pytest_args[@]}" || rc=$?
    finish "$rc"
fi

# The work tree as it is (tracked and new files, not what .gitignore names), without
# .git and .venv: the venv is used where it is.
copy=$(mktemp -d /tmp/ebsfs-unprivileged.XXXXXX)
trap 'rm -rf "$copy"' EXIT
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' path; do [ -e "$path" ] && printf '%s\0' "$path"; done \
    | tar --null -T - -cf - | tar -xf - -C "$copy"
chmod -R u=rwX,go=rX "$copy"

as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all env -i
           PATH="$PATH" HOME=/tmp LANG=C.UTF-8 PYTHONPATH="$copy")
# The tests start `sys.executable` again (python -m ebsfs ...), so user 65534 must be able
# to run it. Where the venv's interpreter is out of its reach (a Python under /root, as
# pyenv installs it), a venv of its own in the copy: the interpreter copied, the packages
# those of .venv (a .pth file adds its site-packages), its commands (lint-imports, ...)
# started by the copied interpreter.
if ! "${as_nobody[@]}" sh -c '"$0" -c "import ebsfs"' "$python" >/dev/null 2>&1; then
    "$python" -m venv --copies --without-pip "$copy/.venv"
    site=$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    own=$("$copy/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "import site; site.addsitedir('$site')" > "$own/ebsfs-venv.pth"
    for command in .venv/bin/*; do
        target="$copy/.venv/bin/${command##*/}"
        if [ -f "$command" ] && [ ! -e "$target" ] && head -c 64 "$command" | grep -q '^#!.*python'; then
            sed "1s|.*|#!$copy/.venv/bin/python|" "$command" > "$target"
            chmod 755 "$target"
        fi
    done
    chmod -R u=rwX,go=rX "$copy/.venv"
    python="$copy/.venv/bin/python"
    if ! "${as_nobody[@]}" sh -c '"$0" -c "import ebsfs"' "$python" >/dev/null 2>&1; then
        echo "test_unprivileged: user 65534 cannot run Python with this venv's packages" >&2
        exit 1
    fi
fi

# unshare -m: a private mount namespace, so hiding /dev/fuse (a bind mount of
# /dev/null over it) is seen by this run only and ends with it.
rc=0
unshare -m -- sh -c '
    set -e
    if [ -e /dev/fuse ]; then mount --bind /dev/null /dev/fuse; fi
    copy=$1; shift
    cd "$copy"
    exec "$@"
' sh "$copy" "${as_nobody[@]}" "$python" "${pytest_args[@]}" || rc=$?
finish "$rc"
