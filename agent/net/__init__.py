"""Bringing up the boot network: our own DHCP client and the static `ip=` configuration.

dhcpmsg.py   DHCP messages (RFC 2131/2132): decode, validate and encode, pure
dhcp.py      the DHCP client's state machine, sans-I/O (agent.sansio.Engine)
ipconfig.py  what to do from pxelinux's/the kernel's `ip=` and `BOOTIF=` values and the interfaces present, pure
bringup.py   the shell: DHCP on one or several interfaces over UDP, applying a lease or a static address through
             agent.netif, keeping a lease renewed in the background
"""
