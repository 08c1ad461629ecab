"""Running generation workers on a Ray cluster: the glue around Ray, and the Ray-free parts it uses."""
