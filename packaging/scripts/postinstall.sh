#!/bin/sh
# After the files are in place. deb: $1 = configure (and $2 = the version
# upgraded from, if any); rpm: $1 = 1 on install, 2 on upgrade.
set -e
# The owners and modes the roles check at start, whatever an earlier version
# or an operator left.
chown root:ferry /etc/ferry && chmod 0750 /etc/ferry
for role in server agent bridge; do
	install -d -o ferry -g ferry -m 0700 /var/lib/ferry/$role
done
chown root:root /var/lib/ferry && chmod 0755 /var/lib/ferry
install -d -o root -g root -m 0755 /var/opt/azcmagent
install -d -o ferry -g ferry -m 0711 /var/opt/azcmagent/tokens

if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
	upgrade=
	case "$1" in
	configure) [ -n "$2" ] && upgrade=1 ;;
	2) upgrade=1 ;;
	esac
	if [ -n "$upgrade" ]; then
		# An upgrade restarts the roles that run, one package (one node) at
		# a time: a rolling upgrade (docs/upgrade.md).
		systemctl try-restart ferry-server.service ferry-agent.service ferry-bridge.service >/dev/null 2>&1 || true
	fi
fi
exit 0
