"""First boot of the appliance image: apply meshpi.toml from the boot partition, once.

config.py  parse and check the file (pure; errors name the field and quote the value,
           never a secret)
plan.py    what to do about it: files to write, commands to run, the file rewritten
           without its secrets, the LAN to share (pure)
run.py     the effects, in two phases (`meshpi-firstboot system|mesh`), and the report
           in /var/lib/meshpi/firstboot.json
"""
