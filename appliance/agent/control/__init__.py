"""The agent's link to control: the sealed protocol client, the long-poll link that
feeds the netmap to the loop, and the control server this node may run itself."""
