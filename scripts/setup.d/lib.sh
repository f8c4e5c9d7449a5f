# Helpers sourced by the setup steps (this file itself is not a step: it has no number).
apt_install() {
  # Installs the Debian packages not installed yet; runs apt-get update at most once a day.
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then echo "    apt: all present ($*)"; return 0; fi
  echo "    apt: installing ${missing[*]}"
  local stamp=/var/lib/apt/periodic/salvus-update-stamp
  if [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
    apt-get update -q >/dev/null
    mkdir -p "$(dirname "$stamp")"; touch "$stamp"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}
