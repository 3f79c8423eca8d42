"""Tools that look inside a backbone and its post-trained variants (`dihal mechanism`)."""
