# taskmux on CPU. Build: docker build -t taskmux .   Run: docker run -p 8080:8080 taskmux
# Mount your own model / tasks:  -v $PWD/mymodel:/app/models/mine -e TASKMUX_MODEL=/app/models/mine
#                                -v $PWD/adapters:/app/adapters -v $PWD/prompt-tables:/app/prompt-tables
FROM node:20-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json .npmrc ./
ENV npm_config_onnxruntime_node_install=skip
RUN npm ci --omit=dev --no-audit --no-fund

FROM node:20-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production HOST=0.0.0.0 PORT=8080 XDG_CACHE_HOME=/app/.cache
COPY --from=deps /app/node_modules ./node_modules
COPY package.json tsconfig.json ./
COPY src ./src
COPY scripts ./scripts
COPY models ./models
COPY prompt-tables ./prompt-tables
COPY adapters ./adapters
# Make the embedded default model at build time so the container starts serving at once.
RUN node --import tsx scripts/make-model.ts --preset default --seed 0 --out models/default --if-missing \
 && mkdir -p /app/.cache && chown -R node:node /app
USER node
EXPOSE 8080
VOLUME ["/app/models", "/app/prompt-tables", "/app/adapters"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD node -e "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"
# node directly (not npm): SIGTERM reaches the server, which drains running sequences before exiting.
CMD ["node", "--import", "tsx", "src/main.ts"]
