#!/bin/sh
# Before the files go. deb: $1 = remove | upgrade | deconfigure;
# rpm: $1 = 0 on removal, 1 on upgrade. Only a removal stops the roles.
set -e
case "$1" in
remove|0)
	if [ -d /run/systemd/system ]; then
		systemctl stop ferry-bridge.service ferry-agent.service ferry-server.service >/dev/null 2>&1 || true
		systemctl disable ferry-bridge.service ferry-agent.service ferry-server.service >/dev/null 2>&1 || true
	fi
	;;
esac
exit 0
