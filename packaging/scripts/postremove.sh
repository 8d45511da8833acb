#!/bin/sh
# After the files are gone. deb: $1 = remove | purge | upgrade | ...;
# rpm: $1 = 0 on removal, 1 on upgrade.
# State (/var/lib/ferry: CA and JWT keys, the Raft log, agent SVIDs) is never
# deleted by the package, not even on purge: it is a trust domain's keys.
# Remove it by hand for a clean slate (docs/install.md). The user and groups
# stay, so that a uid is never reused for another owner of those files.
set -e
case "$1" in
purge)
	# dpkg has removed the conffiles; drop what is left of /etc/ferry if the
	# operator put nothing else there.
	rmdir /etc/ferry 2>/dev/null || true
	;;
esac
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
