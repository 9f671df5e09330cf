# Makes this folder a package so gin resolves 'moescale/gin/...' includes (see gin_config).
