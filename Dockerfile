# snapgen: the package with `snapgen` as the entry point.
#   docker build -t snapgen .
#   docker run snapgen                                    # the CPU demo (recipes/demo.toml)
#   docker run snapgen run /recipes/paper.toml --dry-run
FROM python:3.11-slim
WORKDIR /opt/snapgen
COPY pyproject.toml README.md ./
COPY snapgen_cli ./snapgen_cli
COPY recipes /recipes
# The same install as the README's `make setup` (torch 2.14.1 / torchvision 0.29.1, numpy < 2.4).
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .
WORKDIR /work
ENTRYPOINT ["snapgen"]
CMD ["run"]
