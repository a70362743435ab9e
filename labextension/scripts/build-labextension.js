#!/usr/bin/env node
// Build the prebuilt (federated) extension offline. The builder wants a folder whose
// package.json is JupyterLab's core package; @jupyterlab/core-meta ships it as
// core.package.json, so lay it out where the builder looks instead of fetching it.
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const here = path.resolve(__dirname, '..');
const core = path.join(here, 'node_modules', '.core-meta');
fs.mkdirSync(core, { recursive: true });
fs.copyFileSync(
  require.resolve('@jupyterlab/core-meta/core.package.json', { paths: [here] }),
  path.join(core, 'package.json')
);
const builder = require.resolve('@jupyterlab/builder/lib/build-labextension.js', { paths: [here] });
const args = [builder, '--core-path', core];
if (process.argv.includes('--development')) {
  args.push('--development');
}
execFileSync(process.execPath, [...args, here], { stdio: 'inherit', cwd: here });
