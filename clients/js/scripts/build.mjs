// The one build of the client: dist/ssehub-client.js, an ES module in one file,
// the same file npm publishes and ssehub serves at /ssehub-client.js
// (`npm run static` copies it into app/static). Deterministic: same sources and
// lock file, same bytes, which is what CI compares.
import { build } from "esbuild";

const { version } = JSON.parse(await (await import("node:fs/promises")).readFile("package.json", "utf8"));

await build({
  entryPoints: ["src/index.ts"],
  outfile: "dist/ssehub-client.js",
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: ["es2022", "chrome100", "firefox100", "safari15.4", "node20"],
  legalComments: "none",
  banner: {
    js: `// ssehub-client ${version}: built from clients/js by \`npm run build\`; do not edit.`,
  },
  logLevel: "warning",
});
