# Sourced by scripts/test.sh and scripts/demo.sh: run inside a virtual environment. An active one is used as
# it is; otherwise ./.venv is made (without the system's site-packages, so an undeclared dependency fails
# here as it would on a user's fresh machine) and activated.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "== making a virtual environment in .venv ($(${PYTHON:-python3} --version))"
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "imedsam needs Python 3.10 or newer")'
# pip's options for both scripts. --no-compile: pip byte-compiles every file it installs (torch's thousands: 45 s
# of a 100 s install on two cores); Python compiles only what is imported, once, on first import
PIP_INSTALL=(-m pip install -q --no-compile --disable-pip-version-check)
