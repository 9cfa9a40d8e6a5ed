# snapgen: the package with `snapgen` as the entry point.
#   docker build -t snapgen .
#   docker run snapgen                                   # the demo (a later issue makes it train)
#   docker run snapgen run /recipes/paper.toml --dry-run
FROM python:3.11-slim
WORKDIR /opt/snapgen
COPY pyproject.toml README.md ./
COPY snapgen_cli ./snapgen_cli
COPY recipes /recipes
# Same install step as the README's `make setup`.
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .
ENTRYPOINT ["snapgen"]
CMD ["run", "/recipes/paper.toml", "--dry-run"]
