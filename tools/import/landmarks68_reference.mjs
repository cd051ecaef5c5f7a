// Reference outputs of face-api's FaceLandmark68Net, computed by the package's own code
// (its node build dist/face-api.node-wasm.js on @tensorflow/tfjs, with tfjs's cpu backend).
//
// Usage: node landmarks68_reference.mjs NODE_PREFIX MODEL_DIR REQUEST_JSON
//   NODE_PREFIX: dir whose node_modules holds @vladmandic/face-api and @tensorflow/tfjs
//   REQUEST_JSON: {"batches": [[{"file": "x.u8", "height": H, "width": W}, ...], ...]}
//     each file holds H*W*3 RGB bytes (HWC).
// Prints JSON to stdout: per batch, the pre-normalisation network input (`toBatchTensor`),
// the raw 136 outputs (`runNet`) and the landmark positions in crop pixels (`detectLandmarks`).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [prefix, modelDir, requestPath] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(prefix), 'package.json'));
const faceapi = require('@vladmandic/face-api/dist/face-api.node-wasm.js');
const { tf } = faceapi;
await tf.setBackend('cpu');
await tf.ready();

const manifest = JSON.parse(
  fs.readFileSync(path.join(modelDir, 'face_landmark_68_model-weights_manifest.json'), 'utf8'),
);
const specs = manifest.flatMap((group) => group.weights);
const buffers = manifest.flatMap((group) => group.paths.map((p) => fs.readFileSync(path.join(modelDir, p))));
const bin = Buffer.concat(buffers);
const weightMap = tf.io.decodeWeights(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.length), specs);
const net = new faceapi.FaceLandmark68Net();
net.loadFromWeightMap(weightMap);

const request = JSON.parse(fs.readFileSync(requestPath, 'utf8'));
const dir = path.dirname(requestPath);
const results = [];
for (const batch of request.batches) {
  const images = batch.map(({ file, height, width }) => {
    const bytes = fs.readFileSync(path.join(dir, file));
    if (bytes.length !== height * width * 3) throw new Error(`${file}: expected ${height}x${width}x3 bytes`);
    return tf.tensor3d(Int32Array.from(bytes), [height, width, 3], 'int32');
  });
  const netInput = await faceapi.toNetInput(images);
  const inputTensor = netInput.toBatchTensor(112, true);
  const raw = net.runNet(netInput);
  const landmarks = await net.detectLandmarks(images);
  results.push({
    input_shape: inputTensor.shape,
    input: Array.from(inputTensor.dataSync()),
    raw_shape: raw.shape,
    raw: Array.from(raw.dataSync()),
    positions: landmarks.map((lm) => lm.positions.flatMap((p) => [p.x, p.y])),
  });
  tf.dispose([inputTensor, raw, ...images]);
}
console.log(JSON.stringify({
  tfjs: tf.version.tfjs, backend: tf.getBackend(), faceapi: faceapi.version, batches: results,
}));
