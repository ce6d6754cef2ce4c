// An image with boxes drawn over it: fetched with the token (an <img src> cannot carry one),
// shown through a blob: URL, boxes as positioned outlines sized through the CSSOM (the CSP
// forbids style attributes). Used by the dataset page and by a job's predictions.

import { request } from "./api.js";
import { h } from "./dom.js";

/** boxes: [{bbox: [x, y, w, h], category, score?, kind: "truth" | "detection"}] in image pixels.
 *  Returns {frame, url}; revoke `url` when the view goes. */
export async function boxedImage(path, { width, height, boxes, caption, signal }) {
  const response = await request(path, { signal, raw: true, accept: "image/*" });
  const url = URL.createObjectURL(await response.blob());
  const picture = h("div", { class: "sample-image" }, h("img", { src: url, alt: caption }));
  for (const box of boxes) {
    const [x, y, w, hgt] = box.bbox;
    const label = box.score === undefined ? box.category : `${box.category} ${(100 * box.score).toFixed(0)}%`;
    const mark = h("div", { class: `sample-box ${box.kind || "truth"}`, title: label });
    mark.style.left = `${(100 * x) / width}%`;
    mark.style.top = `${(100 * y) / height}%`;
    mark.style.width = `${(100 * w) / width}%`;
    mark.style.height = `${(100 * hgt) / height}%`;
    picture.append(mark);
  }
  return { frame: h("figure", { class: "sample" }, picture, h("figcaption", {}, caption)), url };
}
